"""Evaluation: greedy answers with upstream's `generate` on the held-out questions, scored on the
answer word they start with (`task.read_answer`), per split; for pruned rows, the share of the
patches of the asked objects' bounding boxes whose tokens reach the last layer (`kept_in_region`;
SparseVLM's recycled, merged tokens are not counted). Rules and budgets are switched only through the public
API: `sparsevlm_patch.enable(model, retain_tokens=, selection=)` / `disable(model)`."""
from __future__ import annotations

import math
import os
import time
from typing import List, Optional

import task

RULES = ("sparsevlm", "sparsevlm_v2", "fastv", "random")
PAPER_BUDGETS = (192, 128, 96, 64)  # of 576 visual tokens; scaled to the tower's count


def row_key(row: dict) -> tuple:
    """What tells one evaluation row from another: the model, the rule, the budget and any
    pruning layers other than the defaults."""
    return row["model"], row["rule"], row["retain"], tuple(row.get("pruning_layers") or ())


def scaled_budget(budget: int, visual_tokens: int) -> int:
    return max(1, round(budget * visual_tokens / 576))


def load(path: str, device: str, dtype):
    """Upstream's model class from a training output folder, its tower in the same dtype."""
    import transformers
    from transformers import AutoTokenizer

    from llava.model import LlavaLlamaForCausalLM

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=True).to(device)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    tower.to(device=device, dtype=dtype)
    model.eval()
    model.config.tokenizer_padding_side = "left"  # batched generation
    return tokenizer, model, tower.image_processor


def prompt_ids(tokenizer, question: str):
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["chatml_direct"].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")


def _mean_se(values: List[float]) -> tuple:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
    return round(mean, 4), round(math.sqrt(var / n), 4)


class Evaluator:
    def __init__(self, records: List[dict], image_folder: str, patch: int, batch: int, device: str):
        self.records, self.image_folder, self.patch = records, image_folder, patch
        self.batch, self.device = batch, device
        self._pixels = {}

    def evaluate(self, loaded, rule: Optional[str], retain: Optional[int], layers: Optional[tuple] = None) -> dict:
        """`rule` None: dense (the plugin disabled on the model); `layers`: pruning layers other
        than the plugin's defaults."""
        import torch
        from PIL import Image

        import sparsevlm_patch
        from llava.mm_utils import process_images

        tokenizer, model, processor = loaded
        if rule is None:
            sparsevlm_patch.disable(model)
        else:
            extra = {"pruning_layers": tuple(layers)} if layers else {}
            sparsevlm_patch.enable(model, retain_tokens=retain, selection=rule, **extra)
        pad = tokenizer.pad_token_id
        started = time.time()
        hits, by_type, regions, flops = {}, {}, {}, [0.0, 0.0]
        with torch.inference_mode():
            for start in range(0, len(self.records), self.batch):
                chunk = self.records[start:start + self.batch]
                prompts = [prompt_ids(tokenizer, r["conversations"][0]["value"].split("\n", 1)[1]) for r in chunk]
                width = max(len(p) for p in prompts)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                for row, p in enumerate(prompts):
                    ids[row, width - len(p):] = p
                mask = ids.ne(pad).long()  # as upstream's training collator: the BOS (= pad) too
                if start not in self._pixels:  # upstream's preprocessing, once per batch
                    pil = [Image.open(os.path.join(self.image_folder, r["image"])).convert("RGB") for r in chunk]
                    self._pixels[start] = (process_images(pil, processor, model.config), [im.size for im in pil])
                pixels, sizes = self._pixels[start]
                pixels = pixels.to(self.device, dtype=model.dtype)
                out = model.generate(ids.to(self.device), attention_mask=mask.to(self.device), images=pixels,
                                     image_sizes=sizes, max_new_tokens=4, do_sample=False,
                                     num_beams=1, use_cache=True, pad_token_id=pad)
                texts = tokenizer.batch_decode(out, skip_special_tokens=True)
                stats = sparsevlm_patch.last_stats(model) if rule is not None else None
                kept = sparsevlm_patch.last_keep_mask(model).cpu() if stats else None
                if stats:
                    flops[0] += stats["flops"]["sparse"]
                    flops[1] += stats["flops"]["dense"]
                for row, (record, text) in enumerate(zip(chunk, texts)):
                    split = record["info"]["split"]
                    hit = task.read_answer(text) == record["conversations"][1]["value"]
                    hits.setdefault(split, []).append(hit)
                    by_type.setdefault(record["info"]["type"], []).append(hit)
                    if stats:
                        (span_start, count), = stats["image_spans"][row]
                        region = task.region_patches(record["scene"], record["info"], self.patch)
                        reached = kept[row, span_start:span_start + count]
                        # The keep mask and the spans must line up: every token the last stage
                        # kept lies in the image span (SparseVLM's merged tokens are not in the mask).
                        kept_last = stats["kept_visual"][row][-1]
                        if int(reached.sum()) > kept_last or (rule != "sparsevlm" and int(reached.sum()) != kept_last):
                            raise AssertionError(f"{rule} {retain}: {int(reached.sum())} kept tokens in the image "
                                                 f"span, {kept_last} kept at the last stage")
                        regions.setdefault(split, []).append(sum(bool(reached[i]) for i in region) / len(region))
                if start == 0:
                    example = {"question": chunk[0]["conversations"][0]["value"].split("\n", 1)[1],
                               "answer": chunk[0]["conversations"][1]["value"], "prediction": texts[0]}
        result = {"rule": rule or "dense", "retain": retain, "seconds": round(time.time() - started, 1),
                  "example": example, "flops_vs_dense": round(flops[0] / flops[1], 4) if flops[1] else 1.0}
        if layers:
            result["pruning_layers"] = list(layers)
        result["per_type"] = {t: round(sum(v) / len(v), 4) for t, v in by_type.items()}
        for split, values in hits.items():
            acc, se = _mean_se([float(v) for v in values])
            # Per question, in the records' order: paired differences between rows need them.
            result[split] = {"accuracy": acc, "se": se, "n": len(values), "hits": "".join("01"[v] for v in values)}
            if split in regions:
                result[split]["kept_in_region"], result[split]["kept_in_region_se"] = _mean_se(regions[split])
        return result


def attention_probe(loaded, records: List[dict], image_folder: str, patch: int, device: str) -> dict:
    """Per layer of the dense model, how much of the attention that the text after the image pays
    to the image lands on the asked objects' patches, over what their share of patches would
    get by chance (1.0: no preference). This is what SparseVLM's text raters rely on."""
    import torch

    import sparsevlm_patch
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images
    from PIL import Image

    tokenizer, model, processor = loaded
    sparsevlm_patch.disable(model)
    lifts = {"object": [], "location": []}
    with torch.inference_mode():
        for record in records:
            ids = prompt_ids(tokenizer, record["conversations"][0]["value"].split("\n", 1)[1])[None]
            mask = ids.ne(tokenizer.pad_token_id)
            image = Image.open(os.path.join(image_folder, record["image"])).convert("RGB")
            pixels = process_images([image], processor, model.config).to(device, dtype=model.dtype)
            out = model(ids.to(device), attention_mask=mask.long().to(device), images=pixels,
                        image_sizes=[image.size], output_attentions=True)
            count = (record["scene"]["size"] // patch) ** 2
            # Upstream's splice drops masked positions (the BOS) and puts the image where its token was.
            start = int(mask[0, :int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])].sum())
            region = torch.tensor(task.region_patches(record["scene"], record["info"], patch), device=device) + start
            chance = len(region) / count
            per_layer = []
            for attn in out.attentions:  # (1, heads, L, L)
                text = attn[0, :, start + count:, :].float()
                on_image = text[..., start:start + count].sum(-1)
                per_layer.append(((text[..., region].sum(-1) / on_image.clamp_min(1e-9)).mean() / chance).item())
            lifts[record["info"]["split"]].append(per_layer)
    return {split: [round(sum(v[k] for v in rows) / len(rows), 3) for k in range(len(rows[0]))]
            for split, rows in lifts.items() if rows}
