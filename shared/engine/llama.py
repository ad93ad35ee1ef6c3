"""A lean forward for the Llama family (Llama, Qwen2, Qwen3, Mistral, Phi-3, SmolLM3, Gemma 2 and 3, OLMo 2) in plain PyTorch.

RMSNorm, RoPE (the checkpoint's own tables: any static scaling, partial rotary
dimensions, layers without RoPE, a table per layer type), Qwen3's per-head q/k norms,
grouped-query attention through `F.scaled_dot_product_attention` (sliding windows on the
layers a config's `layer_types` marks), SwiGLU, tied or untied lm_head; Gemma 3's scaled
embeddings, norms around each block (weights stored as w - 1), GELU and attention scale;
Gemma 2's soft-capped attention scores (an explicit softmax, which SDPA has no option for);
OLMo 2's norms after the attention and the MLP only, and its q/k norms over all heads. Weights are taken
from a transformers model's state dict; q/k/v and gate/up are fused into one matmul each
(Phi-3 ships them fused) so a step issues as few kernels as possible (the fixed cost per
call dominates small models on CPU). The forward reads and writes a `KVCache` at explicit
per-row positions, so one call serves a ragged batch of requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.engine.kv_cache import KVCache

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "phi3", "smollm3", "gemma2", "gemma3_text", "olmo2")
GEMMA = ("gemma2", "gemma3_text")  # norms store w - 1; the embedding is scaled by sqrt(hidden); sandwich norms
OLMO = ("olmo2",)  # norms after the attention and the MLP only; q/k norms over all heads at once
# RoPE types whose frequencies change with the sequence's length: static below a bound
LENGTH_DEPENDENT = ("dynamic", "longrope")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", *LENGTH_DEPENDENT)


class UnsupportedModel(ValueError):
    """The checkpoint is not something the lean forward reproduces exactly."""


_SMALL = 1 << 19  # below this many elements a single row is faster without oneDNN...
_TINY = 1 << 16  # ...and below this, a few rows too (oneDNN costs ~11 us a call)


class _Linear:
    """y = x W^T (+ b), through the fastest path this device has for 1-16 rows.

    On CPU the weight is prepacked once for oneDNN (`mkldnn._linear_pointwise`, the kernel
    torch.compile's CPU backend uses). Measured on these 2-core machines, one thread: a
    30M-parameter model's one-token step runs ~2x and its five-token verify chunk ~3x
    faster than through F.linear (the chunk then costs ~1.2x a step instead of ~2x).
    oneDNN costs ~11 us per call, so a single row through a small weight goes through
    x @ W^T (W^T kept contiguous, float32) or F.linear instead. Elsewhere: F.linear.
    """

    __slots__ = ("w", "wt", "b", "packed", "small", "tiny")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self.w = w.contiguous()
        self.b = b
        self.packed = _prepack(self.w, b)
        self.small = self.w.numel() < _SMALL
        self.tiny = self.w.numel() < _TINY
        cpu32 = self.w.device.type == "cpu" and self.w.dtype == torch.float32
        self.wt = self.w.t().contiguous() if cpu32 and self.small else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.small and x.numel() == x.shape[-1]:
            if self.wt is None:
                return F.linear(x, self.w, self.b)
            y = x @ self.wt
            return y if self.b is None else y + self.b
        if self.packed is not None and not self.tiny:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
        return F.linear(x, self.w, self.b)


def _prepack(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """The oneDNN-packed weight, or None where that path is unavailable or disagrees."""
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, b, "none", [], "")
        tol = 1e-3 if w.dtype == torch.float32 else 5e-2
        if not torch.allclose(got.float(), F.linear(probe, w, b).float(), atol=tol, rtol=tol):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None


@dataclass
class _Layer:
    ln1: torch.Tensor | None  # None: no norm before the attention (OLMo 2)
    qkv: _Linear
    o: _Linear
    ln2: torch.Tensor | None  # the MLP's input norm; None: none (OLMo 2)
    gate_up: _Linear
    down: _Linear
    qk_norm: torch.Tensor | None  # [H + Hk, 1, D]: Qwen3's q_norm per query head, k_norm per key head
    rope: str | None  # the layer's RoPE table (its layer type's); None: no RoPE (SmolLM3's every fourth layer)
    window: int | None  # sliding-window attention: a query sees the last `window` positions
    post_attn: torch.Tensor | None = None  # Gemma 3: norms of the attention's and the MLP's outputs
    post_mlp: torch.Tensor | None = None
    qk_full: tuple[torch.Tensor, torch.Tensor] | None = None  # OLMo 2: q_norm [H * D], k_norm [Hk * D]


def _window_of(config, layer: int) -> int | None:
    """The layer's sliding window, where the config's `layer_types` marks it sliding (and enables it)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not types or not window or types[layer] != "sliding_attention" or not getattr(config, "use_sliding_window", True):
        return None
    return int(window)


def text_part(config, names) -> tuple[object, dict[str, str]]:
    """The language model's config and weight names (as a text-only checkpoint names them:
    `model.layers...`) of a checkpoint that may wrap it with a vision tower (Gemma 3 4B and
    up: `model.language_model.*`); the map goes from those names to the checkpoint's own."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    wrapped = any(name.startswith("model.language_model.") for name in names)
    prefix = "model.language_model." if wrapped else "model."
    own = {("model." + name[len(prefix):] if name.startswith(prefix) else name): name for name in names
           if name.startswith(prefix) or not name.startswith("model.")}
    return text, own


def lean_problem(config, shapes: dict[str, tuple], max_len: int) -> str | None:
    """Why the lean forward cannot reproduce this checkpoint (its config, and its weights'
    names and shapes), or None when it can.

    A RoPE type whose frequencies follow the sequence's length (dynamic NTK, LongRoPE) is
    static up to its original context; past that, transformers recomputes the tables for
    every position at once, which a cache written earlier would not match, so it is refused."""
    config, own = text_part(config, shapes)
    shapes = {name: shapes[checkpoint] for name, checkpoint in own.items()}
    if config.model_type not in SUPPORTED:
        return f"model type {config.model_type!r} is not one of {', '.join(SUPPORTED)} (use --runner hf)"
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if act != ("gelu_pytorch_tanh" if config.model_type in GEMMA else "silu"):
        return f"activation {act!r} is not supported for {config.model_type} (SwiGLU with silu; Gemma's tanh GELU)"
    if getattr(config, "attn_logit_softcapping", None) and config.model_type not in GEMMA:
        return "attention logit soft-capping is not supported"
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "layer_types", None) and window and getattr(config, "use_sliding_window", True) \
            and window < max_len:  # a window on every layer (Mistral's, Phi-3's): only where it changes nothing
        return f"sliding window {window} < max_len {max_len} on every layer is not supported"
    params = getattr(config, "rope_parameters", None) or {}
    layered = isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values())
    for rope in (params.values() if layered else [params]):
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else None
        if rope_type not in ROPE_TYPES:
            return f"rope type {rope_type!r} is not supported by the lean runner (use --runner hf)"
        if rope_type in LENGTH_DEPENDENT:
            bound = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
            bound = bound or getattr(config, "max_position_embeddings", 0)
            if max_len > bound:
                return f"rope type {rope_type!r} changes past {bound} positions; max_len {max_len} is longer"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for name, shape in shapes.items():
        if not name.startswith("model.layers."):
            continue
        if name.endswith(("o_proj.bias", "gate_proj.bias", "up_proj.bias", "down_proj.bias", "gate_up_proj.bias")):
            return "biases on o_proj or the MLP are not supported"
        heads = config.num_attention_heads if name.endswith("q_norm.weight") else \
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if name.endswith(("q_norm.weight", "k_norm.weight")) \
                and tuple(shape) != ((heads * head_dim,) if config.model_type in OLMO else (head_dim,)):
            return f"q/k norms of shape {tuple(shape)} do not fit {config.model_type}'s (head_dim {head_dim})"
    return None


def _rope_tables(hf_model, max_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos and sin [max_len, rotary_dim] as the checkpoint's own rotary embedding computes
    them (its scaling type, attention factor and partial rotary dimensions), float32; per
    layer type where it keeps one table each (Gemma 3: local and global layers), else
    under "default"."""
    body = getattr(hf_model, "model", None)
    rotary = getattr(getattr(body, "language_model", body), "rotary_emb", None)
    if rotary is None:
        raise UnsupportedModel("the checkpoint has no model.rotary_emb")
    positions, x = torch.arange(max_len)[None], torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        if isinstance(getattr(rotary, "rope_type", None), dict):  # one table per layer type
            tables = {kind: rotary(x, positions, kind) for kind in rotary.rope_type}
        else:
            tables = {"default": rotary(x, positions)}
    return {kind: (cos[0].float(), sin[0].float()) for kind, (cos, sin) in tables.items()}


class LeanLlama:
    """Weights and forward of one Llama-family model; no nn.Module, no hooks."""

    def __init__(self, hf_model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, max_len: int = 512):
        state = {name: t.detach() for name, t in hf_model.state_dict().items()}
        if (problem := lean_problem(hf_model.config, {name: tuple(t.shape) for name, t in state.items()}, max_len)):
            raise UnsupportedModel(problem)
        config, own = text_part(hf_model.config, state)  # a vision tower's weights are left alone
        sd = {name: state[checkpoint] for name, checkpoint in own.items()}
        self.device = torch.device(device)
        self.dtype = dtype
        self.vocab_size = config.vocab_size
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.max_len = max_len

        D = self.head_dim
        no_rope = getattr(config, "no_rope_layers", None) or [1] * self.n_layers  # SmolLM3: 0 = no RoPE
        gemma, olmo = config.model_type in GEMMA, config.model_type in OLMO
        tables = _rope_tables(hf_model, max_len)
        types = getattr(config, "layer_types", None)
        self.act = (lambda g: F.gelu(g, approximate="tanh")) if gemma else F.silu
        self.scale = getattr(config, "query_pre_attn_scalar", None) ** -0.5 if gemma else None  # None: 1/sqrt(D)
        # rounded to the dtype first, as transformers does
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device=self.device) if gemma else None
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.attn_softcap = getattr(config, "attn_logit_softcapping", None) if gemma else None  # Gemma 2

        def w(name: str) -> torch.Tensor:
            return sd[name].to(device=self.device, dtype=dtype).contiguous()

        def norm(name: str) -> torch.Tensor:  # Gemma stores w - 1 and computes x * (1 + w), in float32
            return (sd[name].float() + 1.0).to(device=self.device, dtype=dtype).contiguous() if gemma else w(name)

        def cat(names: list[str]) -> torch.Tensor:
            return torch.cat([sd[n] for n in names], 0).to(device=self.device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")
        self.lm_head = _Linear(w("lm_head.weight") if "lm_head.weight" in sd else self.embed, None)
        self.norm = norm("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            fused = a + "qkv_proj.weight" in sd  # Phi-3: q, k, v in one weight, in that order
            qkv = [a + "qkv_proj.weight"] if fused else [a + f"{x}_proj.weight" for x in "qkv"]
            bias = [a + "qkv_proj.bias"] if fused else [a + f"{x}_proj.bias" for x in "qkv"]
            gate_up = [m + "gate_up_proj.weight"] if m + "gate_up_proj.weight" in sd else [m + "gate_proj.weight", m + "up_proj.weight"]
            qk_norm = qk_full = None
            if olmo:
                qk_full = (w(a + "q_norm.weight"), w(a + "k_norm.weight"))
            elif a + "q_norm.weight" in sd:  # Qwen3: RMSNorm over each head's dimensions, before RoPE
                qn, kn = (sd[a + f"{x}_norm.weight"].float() + (1.0 if gemma else 0.0) for x in "qk")
                qk_norm = torch.cat([qn.expand(self.n_heads, D), kn.expand(self.n_kv_heads, D)])[:, None].to(self.device, dtype).contiguous()
            rope = (types[i] if types and types[i] in tables else "default") if no_rope[i] else None
            self.layers.append(
                _Layer(
                    ln1=None if olmo else norm(p + "input_layernorm.weight"),
                    qkv=_Linear(cat(qkv), cat(bias) if all(b in sd for b in bias) else None),
                    o=_Linear(w(a + "o_proj.weight"), None),
                    # the MLP's input norm: Llama's "post_attention_layernorm", Gemma's "pre_feedforward_layernorm"
                    ln2=None if olmo else norm(p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")),
                    gate_up=_Linear(cat(gate_up), None),
                    down=_Linear(w(m + "down_proj.weight"), None),
                    qk_norm=qk_norm,
                    rope=rope,
                    window=_window_of(config, i),
                    post_attn=norm(p + "post_attention_layernorm.weight") if gemma or olmo else None,
                    post_mlp=norm(p + "post_feedforward_layernorm.weight") if gemma or olmo else None,
                    qk_full=qk_full,
                )
            )
        self.rotary_dim = next(iter(tables.values()))[0].shape[-1]  # < head_dim: Phi-3's partial_rotary_factor
        self.tables = {}
        for kind, (cos, sin) in tables.items():
            sin[:, : self.rotary_dim // 2] *= -1  # rotate_half's sign folded in: x*cos + roll(x)*sin
            self.tables[kind] = (cos.to(device=self.device, dtype=dtype), sin.to(device=self.device, dtype=dtype))
        self.windows = sorted({layer.window for layer in self.layers if layer.window})
        self.causal = torch.ones(max_len, max_len, dtype=torch.bool, device=self.device).tril()
        self.arange = torch.arange(max_len, device=self.device)

    def new_cache(self, slots: int) -> KVCache:
        return KVCache(self.n_layers, slots, self.n_kv_heads, self.max_len, self.head_dim, self.dtype, self.device)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        if r == self.head_dim:
            return torch.addcmul(x * cos, x.roll(r // 2, dims=-1), sin)
        rot = x[..., :r]
        return torch.cat([torch.addcmul(rot * cos, rot.roll(r // 2, dims=-1), sin), x[..., r:]], dim=-1)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of queries [B, H, T, D] over keys and values [B, Hk, S, D] (`mask` [.., T, S], True: seen)."""
        H, Hk = self.n_heads, self.n_kv_heads
        if self.attn_softcap is None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=Hk != H)
        # Gemma 2: scores soft-capped by tanh before the softmax, which SDPA has no option for
        if Hk != H:
            keys, values = keys.repeat_interleave(H // Hk, dim=1), values.repeat_interleave(H // Hk, dim=1)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)

    def forward(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        slots: list[int],
        starts: list[int],
        lengths: list[int],
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for a ragged batch, writing its keys and values into `cache`.

        tokens [B, T] (rows right-padded), row b holds lengths[b] new tokens for slot
        slots[b] at positions starts[b].. . Returns [B, T, V] logits, or [B, V] at each
        row's last real token when last_only.

        Rows of different lengths are packed outside attention: the projections, the MLPs
        and the head run on the real tokens only, so a step whose requests verify different
        numbers of drafts costs its tokens, not its rows times the longest.
        """
        B, T = tokens.shape
        H, Hk, D = self.n_heads, self.n_kv_heads, self.head_dim
        kv_len = max(s + n for s, n in zip(starts, lengths))
        if B == 1:
            s0 = starts[0]
            pos = self.arange[s0 : s0 + T]
            rot = {kind: (cos[pos][None, None], sin[pos][None, None]) for kind, (cos, sin) in self.tables.items()}  # [1, 1, T, D]
            mask = None if T == 1 else self.causal[s0 : s0 + T, :kv_len]
            slot = slots[0]
        else:
            start_t = torch.tensor(starts, device=self.device)
            len_t = torch.tensor(lengths, device=self.device)
            offs = self.arange[:T]
            valid = offs[None, :] < len_t[:, None]  # [B, T]
            pos = torch.where(valid, start_t[:, None] + offs[None, :], 0)  # padding attends to position 0
            rot = {kind: (cos[pos][:, None], sin[pos][:, None]) for kind, (cos, sin) in self.tables.items()}  # [B, 1, T, D]
            mask = (self.arange[:kv_len][None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, kv_len]
            slot_t = torch.tensor(slots, device=self.device)
            first = slots[0]
            run = slots == list(range(first, first + B))  # consecutive slots: read a view, copy nothing
            w_slot = torch.where(valid, slot_t[:, None], cache.scratch)
            w_pos = torch.where(valid, pos, offs[None, :])
        masks = {None: mask}
        for window in self.windows:  # sliding layers also drop the keys `window` or more positions back
            recent = self.arange[:kv_len] > (pos[..., None] - window)  # [T, kv_len] or [B, T, kv_len]
            if B == 1:
                masks[window] = recent[None, None] if mask is None else (mask & recent)[None, None]
            else:
                masks[window] = mask & recent[:, None]
        # bf16/fp16 attention rounds differently for 5 queries than for 1; a chunk then
        # computes its queries one by one so that it reproduces the decode steps bit for bit
        per_query = B == 1 and 1 < T <= 32 and self.dtype != torch.float32
        packed = valid.reshape(-1).nonzero().squeeze(1) if B > 1 and sum(lengths) < B * T else None  # real tokens
        x = F.embedding(tokens if packed is None else tokens.reshape(-1)[packed], self.embed)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for li, layer in enumerate(self.layers):
            h = x if layer.ln1 is None else F.rms_norm(x, (x.shape[-1],), layer.ln1, self.eps)
            qkv = layer.qkv(h)
            if layer.qk_full is not None:  # OLMo 2: q and k normalised over all their heads at once
                qn, kn = layer.qk_full
                qkv = torch.cat([F.rms_norm(qkv[..., : H * D], (H * D,), qn, self.eps),
                                 F.rms_norm(qkv[..., H * D : (H + Hk) * D], (Hk * D,), kn, self.eps),
                                 qkv[..., (H + Hk) * D :]], dim=-1)
            if packed is not None:
                qkv = _unpacked(qkv, packed, B * T)
            heads = qkv.view(B, T, H + 2 * Hk, D).transpose(1, 2)  # [B, H + 2Hk, T, D]
            qk = heads[:, : H + Hk]
            if layer.qk_norm is not None:
                qk = F.rms_norm(qk, (D,), None, self.eps) * layer.qk_norm
            if layer.rope is not None:
                qk = self._rope(qk, *rot[layer.rope])  # one RoPE for queries and keys
            q, k, v = qk[:, :H], qk[:, H:], heads[:, H + Hk :]
            ck, cv = cache.k[li], cache.v[li]
            if B == 1:
                ck[slot, :, s0 : s0 + T] = k[0]
                cv[slot, :, s0 : s0 + T] = v[0]
                keys, values = ck[slot : slot + 1, :, :kv_len], cv[slot : slot + 1, :, :kv_len]
            else:
                ck[w_slot, :, w_pos] = k.transpose(1, 2)
                cv[w_slot, :, w_pos] = v.transpose(1, 2)
                if run:
                    keys, values = ck[first : first + B, :, :kv_len], cv[first : first + B, :, :kv_len]
                else:
                    keys, values = ck[slot_t, :, :kv_len], cv[slot_t, :, :kv_len]
            if per_query:  # reduced precision: one query at a time, exactly as a decode step computes it
                o = torch.cat(
                    [
                        self._attend(q[:, :, t : t + 1], keys[:, :, lo : s0 + t + 1], values[:, :, lo : s0 + t + 1], None)
                        for t in range(T)
                        for lo in [max(0, s0 + t + 1 - layer.window) if layer.window else 0]
                    ],
                    dim=2,
                )
            else:
                o = self._attend(q, keys, values, masks[layer.window])
            o = o.transpose(1, 2).reshape(B, T, H * D)
            o = layer.o(o if packed is None else o.reshape(B * T, H * D)[packed])
            x = x + (o if layer.post_attn is None else F.rms_norm(o, (o.shape[-1],), layer.post_attn, self.eps))
            h = x if layer.ln2 is None else F.rms_norm(x, (x.shape[-1],), layer.ln2, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            m = layer.down(self.act(gate) * up)
            x = x + (m if layer.post_mlp is None else F.rms_norm(m, (m.shape[-1],), layer.post_mlp, self.eps))
        if last_only:
            if B == 1:
                x = x[:, lengths[0] - 1]
            elif packed is not None:
                x = x[torch.tensor(lengths, device=self.device).cumsum(0) - 1]
            else:
                x = x[torch.arange(B, device=self.device), torch.tensor(lengths, device=self.device) - 1]
        x = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        logits = self.lm_head(x)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if packed is not None and not last_only:
            logits = _unpacked(logits, packed, B * T).view(B, T, -1)
        return logits


def _unpacked(rows: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed rows [N, F] back at their places `packed` among n padded ones (zeros elsewhere)."""
    out = rows.new_zeros(n, rows.shape[-1])
    return out.index_copy_(0, packed, rows)
