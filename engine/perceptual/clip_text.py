"""CLIP's text encoder — the byte-level BPE tokenizer and the causal text transformer — as U-ViT's MS-COCO setup
uses it (github baofff/U-ViT `libs/clip.py` FrozenCLIPEmbedder: openai/clip-vit-large-patch14, captions padded to
77 tokens, the last hidden state 77 × 768 stored per caption; docs/spec/mf.md §4, issue 21).

    enc = CLIPTextEncoder.from_directory("weights/clip-vit-large-patch14")   # config.json, vocab.json, merges.txt,
    feats = enc.encode(["a cat on a mat", ""])                                # model.safetensors (or .bin)
    # feats: float32 [2, 77, 768]; "" is the null caption classifier-free guidance uses

The directory is the Hugging Face layout of the released model (what `huggingface-cli download
openai/clip-vit-large-patch14` writes); the weights are read from it with the `text_model.` prefix of
CLIPTextModel / CLIPModel checkpoints, so either file works. Tests check both halves against the `transformers`
implementation on random weights and a generated vocabulary (tests/test_text.py).

Tokenizer: text is cleaned as OpenAI's CLIP tokenizer does (HTML entities unescaped — which `transformers`' fast
tokenizer does not do —, whitespace collapsed, lower-cased, NFC), split by CLIP's
pattern (contractions, letter runs, single digits, other non-space runs), each piece's UTF-8 bytes mapped to
printable characters (GPT-2's byte table), the last one marked with "</w>", and merged by rank; then
[<|startoftext|>] + up to 75 tokens + [<|endoftext|>], padded to 77 with <|endoftext|> (the pad token of the
released tokenizer). Transformer: token + position embeddings, pre-LayerNorm blocks of causal multi-head attention
and an MLP with CLIP's quick-GELU x·σ(1.702x), final LayerNorm; no padding mask (FrozenCLIPEmbedder passes none).
"""
from __future__ import annotations

import functools
import html
import json
import math
import os
import unicodedata

import regex
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import EngineError

CONTEXT = 77
_PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                         r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@functools.lru_cache(None)
def byte_table() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def clean(text: str) -> str:
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """CLIP's BPE from a `vocab.json` (token → id) and `merges.txt` (ranked pairs, a header line first)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context: int = CONTEXT):
        self.vocab, self.context = vocab, int(context)
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        for special in ("<|startoftext|>", "<|endoftext|>"):
            if special not in vocab:
                raise EngineError(f"the CLIP vocabulary has no {special} token")
        self.bos, self.eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_directory(cls, directory: str) -> "CLIPTokenizer":
        vocab = json.load(open(os.path.join(directory, "vocab.json"), encoding="utf-8"))
        lines = open(os.path.join(directory, "merges.txt"), encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if len(line.split()) == 2]
        return cls(vocab, merges)

    def bpe(self, piece: str) -> list[str]:
        if piece in self._cache:
            return self._cache[piece]
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        self._cache[piece] = word
        return word

    def tokens(self, text: str) -> list[int]:
        """The BPE ids of `text`, without the start / end tokens."""
        table = byte_table()
        ids = []
        for piece in _PATTERN.findall(clean(text)):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.vocab[piece])
                continue
            mapped = "".join(table[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[t] for t in self.bpe(mapped))
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """int64 [len(texts), 77]: start, at most 75 tokens (truncated), end, then end tokens as padding."""
        rows = []
        for text in texts:
            ids = [self.bos] + self.tokens(text)[:self.context - 2] + [self.eos]
            rows.append(ids + [self.eos] * (self.context - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x, eps_ln: float):
        B, N, C = x.shape
        h = F.layer_norm(x, (C,), self.layer_norm1.weight, self.layer_norm1.bias, eps_ln)
        split = lambda t: t.reshape(B, N, self.heads, C // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out_proj(a.transpose(1, 2).reshape(B, N, C))
        h = self.fc1(F.layer_norm(x, (C,), self.layer_norm2.weight, self.layer_norm2.bias, eps_ln))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))          # quick-GELU


class CLIPTextEncoder(nn.Module):
    """The text transformer (CLIPTextModel's `text_model`); `forward(ids)` → the last hidden state [B, 77, dim]."""

    def __init__(self, vocab_size: int = 49408, dim: int = 768, depth: int = 12, heads: int = 12, mlp: int = 3072,
                 context: int = CONTEXT, layer_norm_eps: float = 1e-5, tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(context, dim)
        self.layers = nn.ModuleList(_Layer(dim, heads, mlp) for _ in range(depth))
        self.final_layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.eps, self.dim, self.context, self.tokenizer = layer_norm_eps, dim, context, tokenizer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding.weight[:ids.shape[1]]
        for layer in self.layers:
            x = layer(x, self.eps)
        return self.final_layer_norm(x)

    @torch.no_grad()
    def encode(self, texts: list[str], batch: int = 256) -> torch.Tensor:
        """float32 [len(texts), 77, dim] for captions (the tokenizer from the same directory)."""
        if self.tokenizer is None:
            raise EngineError("CLIPTextEncoder.encode needs its tokenizer (build it with from_directory)")
        device = self.token_embedding.weight.device
        out = [self(self.tokenizer(texts[i:i + batch]).to(device)).float().cpu()
               for i in range(0, len(texts), batch)]
        return torch.cat(out) if out else torch.zeros(0, self.context, self.dim)

    @classmethod
    def from_directory(cls, directory: str) -> "CLIPTextEncoder":
        """The released model from a local Hugging Face directory (module docstring); a missing file is named with
        where it comes from."""
        weights = next((os.path.join(directory, f) for f in WEIGHT_FILES
                        if os.path.isfile(os.path.join(directory, f))), None)
        need = [f for f in ("config.json", "vocab.json", "merges.txt")
                if not os.path.isfile(os.path.join(directory, f))]
        if weights is None:
            need.append(" or ".join(WEIGHT_FILES))
        if need:
            raise EngineError(f"the CLIP text encoder directory {directory} lacks {', '.join(need)}: it must hold the "
                              f"Hugging Face files of openai/clip-vit-large-patch14 (`huggingface-cli download "
                              f"openai/clip-vit-large-patch14 --local-dir {directory}`)")
        config = json.load(open(os.path.join(directory, "config.json")))
        config = config.get("text_config", config)        # a CLIPModel config nests the text tower's
        if config.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise EngineError(f"{directory}: hidden_act {config['hidden_act']!r}; this encoder implements CLIP's "
                              f"quick_gelu (openai/clip-vit-large-patch14)")
        net = cls(vocab_size=config.get("vocab_size", 49408), dim=config.get("hidden_size", 768),
                  depth=config.get("num_hidden_layers", 12), heads=config.get("num_attention_heads", 12),
                  mlp=config.get("intermediate_size", 3072), context=config.get("max_position_embeddings", CONTEXT),
                  layer_norm_eps=config.get("layer_norm_eps", 1e-5), tokenizer=CLIPTokenizer.from_directory(directory))
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_released(state, weights)
        return net.eval().requires_grad_(False)

    def load_released(self, state: dict, where: str) -> None:
        """A CLIPModel state dict (keys `text_model.embeddings.*`, `text_model.encoder.layers.*`,
        `text_model.final_layer_norm.*`; the vision tower ignored) or a CLIPTextModel one (the same without the
        prefix), mapped to this module's names."""
        renamed = {}
        for k, v in state.items():
            k = k[len("text_model."):] if k.startswith("text_model.") else k
            if not k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) or k.endswith("position_ids"):
                continue        # the vision tower of a CLIPModel file, buffers
            k = k.replace("embeddings.", "", 1).replace("encoder.", "", 1)
            k = k.replace("self_attn.", "").replace("mlp.", "")
            renamed[k] = v
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        if missing or unexpected:
            raise EngineError(f"{where} is not a CLIP text model checkpoint of this configuration: "
                              f"{len(missing)} missing tensors (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:2]})")
