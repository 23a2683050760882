"""An lmms-eval model that wraps an already-loaded HF model and processor (fake-quantized or not).

Contract with the quantized linears: the model is always called as ``model.generate(**inputs)`` or
``model(**inputs)`` with ``inputs`` exactly as the processor returns them (``input_ids``, never
``inputs_embeds``; ``attention_mask``, ``pixel_values``, ``image_grid_thw`` and, for Qwen2.5-VL,
``mm_token_type_ids``), so a forward pre-hook on the top-level model sees the prompt's ``input_ids``
with the image placeholder tokens at prefill and one token per step while decoding.

The prompt follows lmms-eval's own Qwen2.5-VL model (``lmms_eval/models/simple/qwen2_5_vl.py``): the
task's ``doc_to_text`` as the user text after all of the document's images, the model's chat template
with a generation prompt, greedy decoding, the task's ``until`` strings cut from the answer.

This module imports only ``lmms_eval.api``: lmms-eval loads it from the ``lmms_eval.models`` entry
point while ``lmms_eval.models`` itself is being imported.
"""

from __future__ import annotations

import gc
import logging

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

log = logging.getLogger(__name__)

MODEL_ID = "masquant_hf"


def lmms_eval_manifest():
    """The registry entry of :class:`MasquantHF` (also the payload for the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MasquantHF")


def register_lmms_model() -> None:
    """Make ``simple_evaluate(model="masquant_hf", model_args="pretrained=...")`` resolve to :class:`MasquantHF`."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)


class _Audio:
    """An audio clip among a document's visuals (float32 samples at the processor's rate)."""

    __slots__ = ("array",)

    def __init__(self, array) -> None:
        self.array = array


def _is_audio(visual) -> bool:
    return isinstance(visual, _Audio)


class _StopOnStrings(StoppingCriteria):
    """Stops a row once its generated text contains one of the task's ``until`` strings."""

    def __init__(self, tokenizer, stop_strings: list[str], prompt_len: int):
        self.tokenizer, self.stop_strings, self.prompt_len = tokenizer, stop_strings, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in texts], device=input_ids.device)


class MasquantHF(lmms):
    """lmms-eval simple model around an in-memory HF image-text-to-text model and its processor.

    model, processor: the loaded objects (or ``pretrained``: a local folder to load them from, for use by name).
    max_new_tokens: used when the task's generation_kwargs give none (the paper: 128).
    max_new_tokens_cap: an upper bound on any task's max_new_tokens (None: the task's own value).
    max_new_tokens_per_task: {task: an upper bound on that task's max_new_tokens} (answer lengths).
    system_prompt: None keeps the chat template's default (Qwen2.5-VL: "You are a helpful assistant.").
    min_pixels, max_pixels: the image-token budget for processors with Qwen-style ``size``
        (lmms-eval's Qwen2.5-VL model uses 256*28*28 and 1605632); None keeps the processor's own.
    ignore_stop_strings: ``until`` strings not to honour. Default "\\n\\n", as lmms-eval's own Qwen2.5-VL model:
        lmms-eval puts its few-shot delimiter "\\n\\n" into ``until`` of every task that names none (OCRBench,
        ScienceQA, MMMU), which would cut multi-line answers; the tasks' own stop strings are honoured.
    """

    is_simple = True

    def __init__(self, model=None, processor=None, *, pretrained: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int = 128, system_prompt: str | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, max_new_tokens_cap: int | None = None,
                 max_new_tokens_per_task: dict[str, int] | None = None, ignore_stop_strings: tuple[str, ...] = ("\n\n",),
                 device: str | None = None, max_batch_size: int | None = None, dtype: str = "auto") -> None:
        super().__init__()
        if model is None or processor is None:
            if pretrained is None:
                raise ValueError("MasquantHF needs model and processor objects, or pretrained=<local folder>")
            from transformers import AutoModelForImageTextToText, AutoProcessor

            model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dtype).eval()
            processor = AutoProcessor.from_pretrained(pretrained)
            if device:
                model = model.to(device)
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.max_new_tokens_cap = int(max_new_tokens_cap) if max_new_tokens_cap else None
        self.max_new_tokens_per_task = {str(k): int(v) for k, v in (max_new_tokens_per_task or {}).items()}
        self.system_prompt = system_prompt
        self.ignore_stop_strings = tuple(ignore_stop_strings)
        self.accelerator = None  # keeps lmms-eval from creating one; this wrapper runs in one process
        self._images_kwargs = self._pixel_budget(min_pixels, max_pixels)
        self._warned_sampling = False

    # lmms-eval deletes every nn.Module attribute of the model after each evaluation; the caller owns this one.
    def clean(self) -> None:
        gc.collect()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixel_budget(self, min_pixels: int | None, max_pixels: int | None) -> dict:
        if min_pixels is None and max_pixels is None:
            return {}
        size = dict(getattr(getattr(self.processor, "image_processor", None), "size", None) or {})
        if not {"shortest_edge", "longest_edge"} <= size.keys():
            raise ValueError(f"min_pixels/max_pixels need a Qwen-style image processor size, got {size}")
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        return {"size": size}

    # ---- prompts ---------------------------------------------------------------------------------
    def _messages(self, context: str, visuals: list) -> list[dict]:
        """The user turn: the document's images and audio clips in the task's order, then its text."""
        text = context.replace("<image>", "")
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        content = [{"type": "audio" if _is_audio(v) else "image"} for v in visuals] + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        return messages

    def _visuals(self, doc_to_visual, doc_id: int, task: str, split: str) -> list:
        """PIL images (RGB) and audio clips (float32 numpy at the feature extractor's rate), in the task's order."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        out = []
        for v in visuals:
            if hasattr(v, "convert"):
                out.append(v.convert("RGB"))
            elif isinstance(v, dict) and "array" in v and "sampling_rate" in v:
                out.append(self._audio(v, task))
            else:
                raise NotImplementedError(f"task {task}: visuals must be images or audio dicts "
                                          f"({{'array', 'sampling_rate'}}), got {type(v).__name__}")
        return out

    def _audio(self, clip: dict, task: str):
        import numpy as np

        extractor = getattr(self.processor, "feature_extractor", None)
        if extractor is None:
            raise NotImplementedError(f"task {task} gives audio, but this model's processor takes none")
        audio = np.asarray(clip["array"], dtype=np.float32)
        if audio.ndim > 1:  # channels first (torchcodec) or last: average them
            audio = audio.mean(axis=0 if audio.shape[0] < audio.shape[-1] else -1)
        rate, want = int(clip["sampling_rate"]), int(extractor.sampling_rate)
        if rate != want:
            from masquant.calibration.audio import resample

            audio = resample(audio, rate, want)
        return _Audio(audio)

    def _inputs(self, texts: list[str], visuals: list) -> dict:
        kwargs = dict(text=texts, padding=True, padding_side="left", return_tensors="pt")
        images = [v for v in visuals if not _is_audio(v)]
        audio = [v.array for v in visuals if _is_audio(v)]
        if images:
            kwargs.update(images=images, **self._images_kwargs)
        if audio:
            kwargs["audio"] = audio
        inputs = self.processor(**kwargs)
        return inputs.to(self.device)

    def _prompt_texts(self, contexts: list[str], visuals: list[list]) -> list[str]:
        return [self.processor.apply_chat_template(self._messages(context, doc_visuals), tokenize=False,
                                                   add_generation_prompt=True)
                for context, doc_visuals in zip(contexts, visuals)]

    # ---- generation ------------------------------------------------------------------------------
    def _eos_ids(self) -> list[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _stop_strings(self, gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, list):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list, got {type(until).__name__}")
        return [s for s in until if s and s not in self.ignore_stop_strings]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from lmms_eval import utils

        def by_length(args):
            return -len(self.tokenizer(args[0], add_special_tokens=False).input_ids), args[0]

        order = utils.Collator([r.args for r in requests], by_length, grouping=True)
        results = []
        pbar = tqdm(total=len(requests), desc="generate_until", disable=len(requests) < 2)
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])
            visuals = [self._visuals(doc_to_visual[0], i, tasks[0], splits[0]) for i in doc_ids]
            answers = self._generate(list(contexts), visuals, gen_kwargs, tasks[0])
            for context, answer in zip(contexts, answers):
                results.append(answer)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            pbar.update(len(chunk))
        pbar.close()
        return order.get_original(results)

    @torch.no_grad()
    def _generate(self, contexts: list[str], visuals: list[list], gen_kwargs: dict, task: str | None = None) -> list[str]:
        sampling = (gen_kwargs.get("temperature") or 0) > 0 or gen_kwargs.get("do_sample")
        if sampling or (gen_kwargs.get("num_beams") or 1) > 1:
            if not self._warned_sampling:
                log.warning("task asks for sampling or beams (%s); decoding greedily as in the paper", gen_kwargs)
                self._warned_sampling = True
        inputs = self._inputs(self._prompt_texts(contexts, visuals), [x for v in visuals for x in v])
        prompt_len = inputs["input_ids"].shape[1]
        stops = self._stop_strings(gen_kwargs)
        criteria = StoppingCriteriaList([_StopOnStrings(self.tokenizer, stops, prompt_len)]) if stops else None
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos_ids()[0]
        max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        if self.max_new_tokens_cap:
            max_new = min(max_new, self.max_new_tokens_cap)
        if task in self.max_new_tokens_per_task:
            max_new = min(max_new, self.max_new_tokens_per_task[task])
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new,
            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
            eos_token_id=self._eos_ids(), pad_token_id=pad_id, stopping_criteria=criteria, use_cache=True,
        )
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)
        for stop in stops:
            texts = [t.split(stop)[0] for t in texts]
        return texts

    # ---- log-likelihood --------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from lmms_eval import utils

        def by_length(args):
            return -len(self.tokenizer(args[0] + args[1], add_special_tokens=False).input_ids), args[0]

        order = utils.Collator([r.args for r in requests], by_length)
        results = []
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            contexts, continuations, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            visuals = [self._visuals(doc_to_visual[0], i, tasks[0], splits[0]) for i in doc_ids]
            results.extend(self._loglikelihood(list(contexts), list(continuations), visuals))
        return order.get_original(results)

    @torch.no_grad()
    def _loglikelihood(self, contexts: list[str], continuations: list[str],
                       visuals: list[list]) -> list[tuple[float, bool]]:
        prompts = self._prompt_texts(contexts, visuals)
        inputs = self._inputs([p + c for p, c in zip(prompts, continuations)], [x for v in visuals for x in v])
        logits = self.model(**inputs).logits.float()
        out = []
        for row, continuation in enumerate(continuations):
            n = len(self.tokenizer(continuation, add_special_tokens=False).input_ids)
            if n == 0:
                out.append((0.0, True))
                continue
            target = inputs["input_ids"][row, -n:]  # left padding: the continuation ends every row
            logprobs = torch.log_softmax(logits[row, -n - 1:-1], dim=-1)
            out.append((float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("MasquantHF does not implement multi-round generation")
