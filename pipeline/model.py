"""The video model: a pretrained BLIP-2 that reads T frames instead of one image.

    frames (B, T, 3, S, S) -> frozen ViT per frame -> frame_tokens (B, T, L, D)   [or from the cache]
        -> (+ temporal embedding per frame) -> fuse: concat (B, T*L, D) or mean (B, L, D)
        -> Q-Former (Q learned queries cross-attend to all fused tokens) -> (B, Q, 768)
        -> language_projection -> (B, Q, H) -> language model with the prompt -> caption

Everything is a submodule of transformers' `Blip2ForConditionalGeneration` (or, for an
InstructBLIP checkpoint, `InstructBlipForConditionalGeneration`: same children, a Q-Former that
can also read the instruction); this file only adds frame fusion, temporal embeddings, LoRA, and
calls the language model directly with `inputs_embeds` (bypassing transformers 5's
image-placeholder-token mechanism). What differs between language models is data in
`pipeline.flavours.FLAVOURS` (one row per LM: T5, OPT, LLaMA/Vicuna); the code that applies it and
every transformers-version detail live in one section below, "Flavour- and version-sensitive details".

Export format (`save_trained` / `from_trained`), one folder:
* `video_model.json`: the base `pretrained` reference and every `ModelConfig` setting;
* `trained.safetensors`: trained weights that are not LoRA (Q-Former, query tokens, projection,
  temporal embeddings, the whole LLM when `llm=full`), named as in `trainable_state_dict`;
* `lora/`: a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`) that
  `peft.PeftModel.from_pretrained(language_model, "lora")` opens;
* with `merge_lora=True` instead: a full Hugging Face BLIP-2 folder (LoRA merged into the LLM,
  trained Q-Former in place, tokenizer) plus `video_model.json` (and temporal embeddings).

Without `merge_lora` the folder holds only what training changed and loads the rest (the ViT,
the frozen LLM, the tokenizer) from the base `pretrained`: a hub id, or a local folder recorded
by its absolute path, which must stay there. With `merge_lora` it needs nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel

from pipeline.config import ModelConfig, looks_like_local_path
from pipeline.errors import StageError
from pipeline.flavours import FLAVOURS, Flavour, flavour_of  # noqa: F401 (FLAVOURS, Flavour: re-exported)
from pipeline.sharding import load_full_tensor
from pipeline.vision import ARCHITECTURES, architecture, autocast, compute_dtype, run_vit, tokens_per_frame

EXPORT_FILE = "video_model.json"
TRAINED_WEIGHTS = "trained.safetensors"
LORA_DIR = "lora"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
EXPORT_FORMAT = 1


def is_export(folder: Path) -> bool:
    """Whether `folder` holds a model vidcap wrote (`save_trained`: a checkpoint's best/ or an export)."""
    return (Path(folder) / EXPORT_FILE).is_file()


def export_base(folder: str | Path) -> str | None:
    """The base model an export loads its untrained parts from (None for a merged export, which
    needs nothing else); a local base folder that is gone is a `StageError` saying what to do."""
    meta = json.loads((Path(folder) / EXPORT_FILE).read_text())
    if meta.get("merged"):
        return None
    base = meta["pretrained"]
    if looks_like_local_path(base) and not Path(base).is_dir():
        raise StageError(
            f"{folder} is an export that keeps only the trained weights: it needs its base model "
            f"{base} (`pretrained` in {EXPORT_FILE}), which is not there; put it back, edit that "
            "path, or export again with `vidcap export --merge-lora` for a folder that needs nothing else"
        )
    return base


@dataclass
class GenerationOutput:
    texts: list[str]
    """(B * num_return_sequences) decoded captions, video-major."""
    token_ids: Tensor
    """(B * num_return_sequences, S) caption token ids (no prompt, no decoder start), EOS then pad."""
    logprobs: Tensor | None = None
    """(B * num_return_sequences,) the model's summed log-probs through EOS (`output_logprobs=True`)."""


class VideoCaptioner(nn.Module):
    """BLIP-2 over T frames. `frame_tokens` are always (B, T, L, D): the ViT's last hidden state."""

    def __init__(
        self,
        blip: PreTrainedModel,
        tokenizer: Any,
        model_cfg: ModelConfig,
        pretrained: str,
        device: torch.device,
        adapter_dir: Path | None = None,
        qformer_tokenizer: Any = None,
    ) -> None:
        super().__init__()
        config = blip.config
        self.cfg = model_cfg
        self.pretrained = str(pretrained)
        self.blip = blip
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer  # InstructBLIP's BERT tokenizer (qformer_text_input)
        self.flavour = flavour_of(config.text_config.model_type)
        self.decoder_only = self.flavour.decoder_only
        self.prompt = self.flavour.seed_prompt if model_cfg.prompt is None else model_cfg.prompt
        self.num_query_tokens = config.num_query_tokens
        self.vision_width = config.vision_config.hidden_size
        self.patch_size = config.vision_config.patch_size
        self.image_size = model_cfg.image_size or config.vision_config.image_size  # 0: the checkpoint's own
        self.tokens_per_frame = tokens_per_frame(self.image_size, self.patch_size)
        self.compute_dtype = compute_dtype(model_cfg, device)
        self.temporal_embeddings = (
            nn.Parameter(torch.zeros(model_cfg.num_frames, self.vision_width))
            if model_cfg.temporal_embeddings
            else None
        )  # (T, D), zero so the pretrained model is unchanged at step 0
        self.vit_trainable = model_cfg.vit != "frozen"
        if self.vit_trainable and blip.vision_model is None:
            raise ValueError(
                f"model.vit: {model_cfg.vit}: this model trains its ViT, so it reads frames, not cached "
                "tokens (load it with its ViT: load_vision=True, train.source / eval.source: video)"
            )
        self._prepare_tokens()
        self._place(device)
        if model_cfg.llm == "lora":
            self._add_lora(adapter_dir)
        self._set_trainable()
        if self.vit_trainable and model_cfg.vit_grad_checkpointing:  # active in train mode only
            blip.vision_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.train(False)

    # -----------------------------------------------------------------------------------
    # Loading
    # -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | Path,
        model_cfg: ModelConfig,
        load_vision: bool = True,
        device: str | torch.device | None = None,
    ) -> VideoCaptioner:
        """Load a BLIP-2 (hub id or folder) and its tokenizer; `load_vision=False` drops the ViT."""
        return cls._load(pretrained, model_cfg, load_vision, device)

    @classmethod
    def _load(
        cls,
        pretrained: str | Path,
        model_cfg: ModelConfig,
        load_vision: bool,
        device: str | torch.device | None,
        adapter_dir: Path | None = None,
    ) -> VideoCaptioner:
        # A local folder is recorded as an absolute path, so exports load from any directory.
        if Path(pretrained).is_dir():
            pretrained = Path(pretrained).resolve()
        arch = architecture(pretrained)
        if model_cfg.qformer_text_input and not arch.qformer_takes_text:
            raise ValueError(
                f"model.qformer_text_input: true needs an InstructBLIP checkpoint; {pretrained} is BLIP-2, "
                "whose Q-Former reads no text"
            )
        # fp32 weights are loaded exactly; frozen parts are cast down later (`_place`).
        blip = arch.model.from_pretrained(str(pretrained), dtype=torch.float32)
        if not load_vision:
            blip.vision_model = None  # training from the cache never needs the ViT
        tokenizer = AutoTokenizer.from_pretrained(str(pretrained))
        qformer_tokenizer = (  # saved by InstructBlipProcessor beside the LM's tokenizer
            AutoTokenizer.from_pretrained(str(pretrained), subfolder=QFORMER_TOKENIZER_DIR)
            if model_cfg.qformer_text_input
            else None
        )
        device = torch.device(device or "cpu")
        return cls(blip, tokenizer, model_cfg, str(pretrained), device, adapter_dir, qformer_tokenizer)

    @property
    def device(self) -> torch.device:
        return self.blip.query_tokens.device

    @property
    def language_model(self) -> nn.Module:
        """The transformers LM (LoRA layers injected in place when `llm=lora`)."""
        lm = self.blip.language_model
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    def _add_lora(self, adapter_dir: Path | None) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        lm = self.blip.language_model
        if adapter_dir is not None:
            self.blip.language_model = PeftModel.from_pretrained(lm, str(adapter_dir), is_trainable=True)
            return
        targets = sorted({self.flavour.lora_names.get(t, t) for t in self.cfg.lora_target_modules})
        present = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ValueError(f"model.lora_target_modules: no module named {missing} in {type(lm).__name__}")
        lora = LoraConfig(
            r=self.cfg.lora_r,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=targets,
        )
        self.blip.language_model = get_peft_model(lm, lora)

    def _set_trainable(self) -> None:
        """Q-Former, query tokens, projection, temporal embeddings; plus LoRA or the whole LLM, and
        the ViT when `model.vit: full`."""
        self.requires_grad_(False)
        if self.vit_trainable:
            self.blip.vision_model.requires_grad_(True)
        self.blip.qformer.requires_grad_(True)
        self.blip.query_tokens.requires_grad_(True)
        self.blip.language_projection.requires_grad_(True)
        if self.temporal_embeddings is not None:
            self.temporal_embeddings.requires_grad_(True)
        if self.cfg.llm == "full":
            self.blip.language_model.requires_grad_(True)
        elif self.cfg.llm == "lora":
            for name, param in self.blip.language_model.named_parameters():
                param.requires_grad_("lora_" in name)

    def train(self, mode: bool = True) -> VideoCaptioner:
        super().train(mode)
        if self.blip.vision_model is not None and not self.vit_trainable:
            self.blip.vision_model.eval()  # frozen, always in eval mode
        return self

    @property
    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name fragment (`build_optimizer` applies them)."""
        return {"blip.vision_model.": self.cfg.vit_lr_scale} if self.vit_trainable else {}

    # -----------------------------------------------------------------------------------
    # Frames -> query outputs
    # -----------------------------------------------------------------------------------

    def encode_frames(self, pixel_values: Tensor) -> Tensor:
        """(B, T, 3, S, S) normalised frames -> (B, T, L, D) ViT tokens (post-layernorm)."""
        vit = self.blip.vision_model
        if vit is None:
            raise RuntimeError("this VideoCaptioner was loaded with load_vision=False: it has no ViT")
        grad = self.vit_trainable and self.training  # a trained ViT in training: tokens with gradient
        return run_vit(vit, pixel_values, self.blip.config.vision_config.image_size, self.compute_dtype, grad)

    def fuse_frame_tokens(self, frame_tokens: Tensor) -> Tensor:
        """(B, T, L, D) -> (B, T*L, D) with frame 0 first (concat) or (B, L, D) (mean)."""
        b, t, length, width = frame_tokens.shape
        if width != self.vision_width or length != self.tokens_per_frame:
            raise ValueError(
                f"frame tokens have L={length}, D={width}; this model expects L={self.tokens_per_frame} "
                f"(image_size {self.image_size}, patch {self.patch_size}) and D={self.vision_width}"
            )
        x = frame_tokens.to(self.device, torch.float32)  # the cache is float16; the Q-Former is fp32
        if self.temporal_embeddings is not None:
            if t > self.temporal_embeddings.shape[0]:
                raise ValueError(
                    f"{t} frames but temporal embeddings for model.num_frames={self.cfg.num_frames}"
                )
            x = x + self.temporal_embeddings[:t, None, :]  # (B, T, L, D)
        if self.cfg.fusion == "mean":
            return x.mean(dim=1)  # (B, L, D)
        return x.reshape(b, t * length, width)  # (B, T*L, D)

    def query_outputs(self, frame_tokens: Tensor) -> Tensor:
        """(B, T, L, D) -> (B, Q, H_llm): the projected Q-Former outputs that prefix the LM input."""
        visual = self.fuse_frame_tokens(frame_tokens)  # (B, N, D)
        mask = torch.ones(visual.shape[:2], dtype=torch.long, device=visual.device)  # no padding among frames
        queries = self.blip.query_tokens.expand(visual.shape[0], -1, -1)  # (B, Q, 768)
        # The Q-Former runs in fp32 (transformers keeps it fp32 too); the projection feeds the LLM.
        out = self._run_qformer(queries, visual, mask)  # (B, Q, 768)
        with self._autocast():
            return self.blip.language_projection(out)  # (B, Q, H)

    # -----------------------------------------------------------------------------------
    # Objectives and decoding
    # -----------------------------------------------------------------------------------

    def forward(
        self,
        frame_tokens: Tensor,
        captions: list[str] | None = None,
        token_ids: Tensor | None = None,
        repeats: int = 1,
        prompts: list[str] | None = None,
    ) -> Tensor:
        """`ce_loss` when given captions, else `sequence_logprobs` (DDP only syncs through forward)."""
        if captions is not None:
            return self.ce_loss(frame_tokens, captions, prompts)
        if token_ids is None:
            raise ValueError("forward needs captions (CE loss) or token_ids (sequence log-probs)")
        return self.sequence_logprobs(frame_tokens, token_ids, repeats, prompts=prompts)

    def ce_loss(self, frame_tokens: Tensor, captions: list[str], prompts: list[str] | None = None) -> Tensor:
        """Mean token cross-entropy of the captions (+ EOS) given [queries; prompt].

        `prompts`: one prompt per video (e.g. a question) instead of `model.prompt` for all.
        """
        ids, mask = self._tokenize_captions(captions, prompted=all(prompts) if prompts is not None else None)
        logp = self._caption_token_logprobs(self.query_outputs(frame_tokens), ids, mask, prompts=prompts)
        return -(logp * mask).sum() / mask.sum()  # logp (B, N)

    def sequence_logprobs(
        self,
        frame_tokens: Tensor,
        token_ids: Tensor,
        repeats: int = 1,
        temperature: float = 1.0,
        min_new_tokens: int | None = 0,
        prompts: list[str] | None = None,
    ) -> Tensor:
        """(B*repeats,) summed log-probs of each caption's tokens through its first EOS, with grad.

        `token_ids` (B*repeats, S) as `generate` returns them, video-major (`repeats` samples per
        video); queries are computed once per video and expanded. `temperature` and
        `min_new_tokens` apply what `generate` sampled with (logits / temperature; no EOS before
        `min_new_tokens`, None: the flavour's seed rule), so the log-probs are those of the
        distribution that drew the samples. `prompts`: one per video (B,), as given to `generate`.
        """
        queries = self.query_outputs(frame_tokens).repeat_interleave(repeats, dim=0)  # (B*k, Q, H)
        if prompts is not None:
            prompts = [p for p in prompts for _ in range(repeats)]
        ids = token_ids.to(self.device)
        mask = _through_first(ids, self.eos_token_id)
        logp = self._caption_token_logprobs(
            queries, ids, mask, temperature, self.min_new_tokens(min_new_tokens), prompts
        )
        return (logp * mask).sum(dim=1)

    @torch.no_grad()
    def generate(
        self,
        frame_tokens: Tensor,
        num_beams: int = 5,
        max_new_tokens: int = 32,
        min_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_return_sequences: int = 1,
        output_logprobs: bool = False,
        prompts: list[str] | None = None,
        length_penalty: float = 1.0,
    ) -> GenerationOutput:
        """Captions for each video: beam search, greedy (`num_beams=1`) or sampling (`do_sample=True`).

        `min_new_tokens=None`: the seed's minimum length for this flavour (`min_new_tokens`).
        `prompts`: one per video (a question) instead of `model.prompt`; `length_penalty` as in
        transformers' beam search (negative: shorter answers).
        """
        if output_logprobs and num_beams != 1:
            raise ValueError("output_logprobs needs num_beams=1 (greedy or sampling)")
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
        config = GenerationConfig(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=self.min_new_tokens(min_new_tokens),
            do_sample=do_sample,
            num_return_sequences=num_return_sequences,
            return_dict_in_generate=True,
            output_logits=output_logprobs,
            **({"length_penalty": length_penalty} if num_beams > 1 else {}),
            **sampling,
        )
        out = self._generate(*self._prefix_embeds(self.query_outputs(frame_tokens), prompts), config)
        ids = out.sequences
        if not self.decoder_only:
            ids = ids[:, 1:]  # drop the decoder start token
        mask = _through_first(ids, self.eos_token_id)
        ids = ids.masked_fill(~mask, self.tokenizer.pad_token_id)
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        logprobs = None
        if output_logprobs:
            logits = torch.stack(out.logits, dim=1).float()  # (N, S, V) raw, before temperature etc.
            token = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
            logprobs = (token * mask).sum(dim=1)
        return GenerationOutput(texts=texts, token_ids=ids, logprobs=logprobs)

    # -----------------------------------------------------------------------------------
    # Flavour- and version-sensitive details: T5 vs decoder-only inputs, special tokens,
    # padding, dtype rules. Checked against the plain transformers forward in the tests.
    # -----------------------------------------------------------------------------------

    def min_new_tokens(self, requested: int | None) -> int:
        """`requested`, or when None the seed's rule for this flavour (T5 4, decoder-only 5)."""
        return self.flavour.seed_min_new_tokens if requested is None else int(requested)

    def _run_qformer(self, queries: Tensor, visual: Tensor, mask: Tensor) -> Tensor:
        """(B, Q, 768) queries cross-attending to (B, N, D) visual tokens -> (B, Q, 768), fp32."""
        if self.qformer_prompt_ids is None:
            kwargs = {"input_ids": None} if self.qformer_takes_text else {}  # InstructBLIP: no text
            out = self.blip.qformer(
                query_embeds=queries, encoder_hidden_states=visual, encoder_attention_mask=mask, **kwargs
            )
            return out.last_hidden_state
        # InstructBLIP with `qformer_text_input`: the queries also attend to the prompt's tokens.
        b, q = queries.shape[:2]
        text = self.qformer_prompt_ids[None].expand(b, -1)  # (B, P')
        attention = torch.ones((b, q + text.shape[1]), dtype=torch.long, device=text.device)
        out = self.blip.qformer(
            input_ids=text,
            attention_mask=attention,
            query_embeds=queries,
            encoder_hidden_states=visual,
            encoder_attention_mask=mask,
        )
        return out.last_hidden_state[:, :q]  # the query positions only

    def _prepare_tokens(self) -> None:
        tok = self.tokenizer
        if tok.pad_token_id is None:  # e.g. LLaMA-style tokenizers; masked out everywhere anyway
            tok.pad_token = tok.eos_token
        # Decoder-only: generation is left-padded. A shared prompt needs no padding (fixed query
        # count); per-video prompts (questions) are padded left, between queries and prompt.
        tok.padding_side = "left" if self.decoder_only else "right"
        # The prompt is tokenised with the tokenizer's own special tokens, as the BLIP-2
        # processor and LAVIS do: T5 "a video of</s>", OPT "</s>a video of", LLaMA "<s>...".
        prompt = tok(self.prompt, add_special_tokens=True).input_ids
        self.register_buffer("prompt_ids", torch.tensor(prompt, dtype=torch.long), persistent=False)
        lm_config = self.blip.config.text_config
        self.decoder_start_token_id = None if self.decoder_only else lm_config.decoder_start_token_id
        self.eos_token_id = self._terminator_id()
        self.qformer_takes_text = ARCHITECTURES[self.blip.config.model_type].qformer_takes_text
        if not self.cfg.qformer_text_input:
            self.qformer_prompt_ids = None
            return
        if not self.qformer_takes_text or self.qformer_tokenizer is None:
            raise ValueError(
                "model.qformer_text_input: true needs an InstructBLIP checkpoint with a qformer_tokenizer/ "
                "folder (BLIP-2's Q-Former reads no text)"
            )
        ids = self.qformer_tokenizer(
            self.prompt, add_special_tokens=True
        ).input_ids  # LAVIS: BERT [CLS] ... [SEP]
        self.register_buffer("qformer_prompt_ids", torch.tensor(ids, dtype=torch.long), persistent=False)

    def _terminator_id(self) -> int:
        """The id that ends targets and generation: the flavour's terminator ("\\n" for OPT) or EOS."""
        if self.flavour.terminator is None:
            return self.tokenizer.eos_token_id
        ids = self.tokenizer(self.flavour.terminator, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"the {self.flavour.name} tokenizer encodes the terminator {self.flavour.terminator!r} as "
                f"{ids}, not one token"
            )
        return ids[0]

    def _tokenize_captions(self, captions: list[str], prompted: bool | None = None) -> tuple[Tensor, Tensor]:
        """Captions -> ids (B, N) = at most max_caption_tokens-1 tokens + terminator, right-padded; mask (B, N).

        `prompted`: whether a non-empty prompt precedes the captions (None: `model.prompt` does).
        """
        # Byte-level BPE tokenizers (OPT/GPT-2) mark word starts with a space: a caption after a
        # non-empty prompt starts with one; after "" it does not (LAVIS: "</s>a man ...\n").
        # Whitespace-split tokenizers ignore it.
        space = self.flavour.space_before_caption and (bool(self.prompt) if prompted is None else prompted)
        texts = [(" " + c) if space else c for c in captions]
        limit = max(self.cfg.max_caption_tokens - 1, 0)
        rows = [
            ids[:limit] + [self.eos_token_id]
            for ids in self.tokenizer(texts, add_special_tokens=False).input_ids
        ]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return ids.to(self.device), mask.to(self.device)

    def _prefix_embeds(self, queries: Tensor, prompts: list[str] | None = None) -> tuple[Tensor, Tensor]:
        """(B, Q, H) -> [projected queries ; prompt token embeddings] (B, Q+P, H) and its mask (B, Q+P).

        One shared `model.prompt`, or one prompt per video padded to the longest: on the right for
        T5 (encoder input), on the left for decoder-only LMs (the caption must follow the prompt).
        """
        embed = self.language_model.get_input_embeddings()
        b = queries.shape[0]
        if prompts is None:
            prompt = embed(self.prompt_ids)[None].expand(b, -1, -1)  # (B, P, H)
            prompt_mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=queries.device)
        else:
            if len(prompts) != b:
                raise ValueError(f"{len(prompts)} prompts for {b} videos")
            tokens = self.tokenizer(prompts, add_special_tokens=True, padding=True, return_tensors="pt")
            prompt = embed(tokens.input_ids.to(queries.device))  # (B, P, H)
            prompt_mask = tokens.attention_mask.to(queries.device)
        query_mask = torch.ones(queries.shape[:2], dtype=torch.long, device=queries.device)
        return torch.cat([queries.to(prompt.dtype), prompt], dim=1), torch.cat(
            [query_mask, prompt_mask], dim=1
        )

    def _caption_token_logprobs(
        self,
        queries: Tensor,
        ids: Tensor,
        mask: Tensor,
        temperature: float = 1.0,
        min_new_tokens: int = 0,
        prompts: list[str] | None = None,
    ) -> Tensor:
        """Teacher-forced log p(ids[:, j] | video, prompt, ids[:, :j]) per token: (B, N)."""
        lm = self.language_model
        prefix, prefix_mask = self._prefix_embeds(queries, prompts)  # (B, Q+P, H), (B, Q+P)
        b, n = ids.shape
        with self._autocast():
            if self.decoder_only:  # OPT: one sequence [queries ; prompt ; caption], right-padded
                inputs = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
                attention = torch.cat([prefix_mask, mask.long()], 1)
                logits = lm(inputs_embeds=inputs, attention_mask=attention).logits
                logits = logits[:, prefix.shape[1] - 1 : -1]  # the positions that predict the caption
            else:  # T5: encoder reads [queries ; prompt]; decoder reads <start> + caption shifted right
                start = torch.full((b, 1), self.decoder_start_token_id, dtype=torch.long, device=ids.device)
                shifted = ids[:, :-1].masked_fill(~mask[:, :-1], self.tokenizer.pad_token_id)
                logits = lm(
                    inputs_embeds=prefix,
                    attention_mask=prefix_mask,
                    decoder_input_ids=torch.cat([start, shifted], dim=1),
                ).logits
        logits = logits.float() / temperature  # (B, N, V), fp32
        if min_new_tokens > 0:  # as generate's min-length processor: EOS impossible before then
            early = torch.zeros_like(logits, dtype=torch.bool)
            early[:, :min_new_tokens, self.eos_token_id] = True
            logits = logits.masked_fill(early, -1e9)  # finite: masked-out positions stay 0 * finite
        return -nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")

    def _generate(self, prefix: Tensor, prefix_mask: Tensor, config: GenerationConfig) -> Any:
        """Run transformers' generate from [queries ; prompt] embeddings (B, Q+P, H) and their mask only.

        T5: the embeddings are the encoder input; sequences start with the decoder start token.
        Decoder-only: given `inputs_embeds` and no `input_ids`, sequences hold only new tokens.
        """
        config.eos_token_id = self.eos_token_id  # OPT: "\n", as BLIP-2/LAVIS generate
        config.pad_token_id = self.tokenizer.pad_token_id
        if not self.decoder_only:
            config.decoder_start_token_id = self.decoder_start_token_id
        # Under FSDP (sharded LM blocks) every rank must run as many forwards: generate on until all
        # ranks are done (transformers' `synced_gpus`, as for DeepSpeed ZeRO-3).
        synced = any(isinstance(p, DTensor) for p in self.language_model.parameters())
        with self._autocast():
            return self.language_model.generate(
                inputs_embeds=prefix, attention_mask=prefix_mask, generation_config=config, synced_gpus=synced
            )

    def _place(self, device: torch.device) -> None:
        """dtype rules: trainable parts (Q-Former, queries, projection, temporal, LLM when full)
        keep fp32 master weights; the Q-Former runs in fp32. With bf16 compute the frozen LLM is
        stored in bf16 and runs under bf16 autocast (never fp16: T5 overflows in fp16); the ViT keeps
        fp32 weights under bf16 autocast (`pipeline.vision`'s precision rule, measured)."""
        if self.compute_dtype == torch.bfloat16 and self.cfg.llm != "full":
            self.blip.language_model.to(torch.bfloat16)  # LoRA weights added later stay fp32 (peft)
        self.to(device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.compute_dtype)

    # -----------------------------------------------------------------------------------
    # Trained weights and the export format
    # -----------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Exactly the trainable parameters, by name (detached)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy a `trainable_state_dict` in; the key sets must match exactly."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        _check_keys(set(state), set(params), "trainable state")
        for name, value in state.items():
            load_full_tensor(params[name], value)  # sharded like the parameter under FSDP

    def save_trained(self, out_dir: str | Path, merge_lora: bool = False) -> Path:
        """Write the export folder (see the module docstring); returns it."""

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        settings = dataclasses.asdict(self.cfg)
        settings["pretrained"] = self.pretrained
        settings["image_size"] = self.image_size  # the size it was trained at, never "the checkpoint's"
        lora = self.cfg.llm == "lora" and not merge_lora
        if merge_lora:
            self._save_full_copy(out)
            if self.cfg.llm == "lora":
                settings["llm"] = "frozen"  # the LoRA update now lives in the LLM weights
            weights = (
                {"temporal_embeddings": self.temporal_embeddings}
                if self.temporal_embeddings is not None
                else {}
            )
        else:
            weights = {k: v for k, v in self.trainable_state_dict().items() if "lora_" not in k}
        if lora:
            self.blip.language_model.save_pretrained(str(out / LORA_DIR))
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(out / TRAINED_WEIGHTS))
        meta = {
            "format": EXPORT_FORMAT,
            "pretrained": self.pretrained,
            "merged": merge_lora,
            "lora": LORA_DIR if lora else None,
            "weights": TRAINED_WEIGHTS,
            "model": settings,
        }
        (out / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    def _save_full_copy(self, out: Path) -> None:
        """A plain BLIP-2 folder with this model's Q-Former/projection and the LoRA merged in."""
        blip = self.blip
        lm, own_vision = blip.language_model, blip.vision_model
        merged = copy.deepcopy(lm).merge_and_unload() if self.cfg.llm == "lora" else lm  # self stays as is
        vision = own_vision
        if vision is None:  # dropped at load time: take the (frozen, unchanged) ViT from the base again
            vision = (
                architecture(self.pretrained)
                .model.from_pretrained(self.pretrained, dtype=torch.float32)
                .vision_model
            )
        try:
            blip.language_model, blip.vision_model = merged, vision
            blip.save_pretrained(str(out))
        finally:
            blip.language_model, blip.vision_model = lm, own_vision
        self.tokenizer.save_pretrained(str(out))
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(str(out / QFORMER_TOKENIZER_DIR))

    @classmethod
    def from_trained(
        cls, folder: str | Path, device: str | torch.device | None = None, load_vision: bool = True
    ) -> VideoCaptioner:
        """Open an export folder written by `save_trained`."""

        folder = Path(folder)
        meta = json.loads((folder / EXPORT_FILE).read_text())
        model_cfg = export_settings(folder)
        base = model_cfg.pretrained
        adapter = folder / meta["lora"] if meta["lora"] else None
        model = cls._load(base, model_cfg, load_vision, device, adapter_dir=adapter)
        weights = load_file(str(folder / meta["weights"]), device=str(model.device))
        if meta["merged"]:
            expected = {"temporal_embeddings"} if model.temporal_embeddings is not None else set()
        else:
            expected = {k for k in model.trainable_state_dict() if "lora_" not in k}
        _check_keys(set(weights), expected, str(folder / meta["weights"]))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        return model


def export_settings(folder: str | Path) -> ModelConfig:
    """The model settings an export was trained with (frames, image size...); `pretrained` is its base."""
    folder = Path(folder)
    meta = json.loads((folder / EXPORT_FILE).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder / EXPORT_FILE}: unsupported export format {meta.get('format')!r}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    # A merged export is its own base: a full BLIP-2 folder with the trained weights inside.
    model_cfg.pretrained = export_base(folder) or str(folder)
    return model_cfg


def _through_first(ids: Tensor, eos_id: int) -> Tensor:
    """(N, S) bool: True up to and including each row's first EOS (all True when it has none)."""
    is_eos = (ids == eos_id).long()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


def _check_keys(got: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise KeyError(
            f"{what}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
