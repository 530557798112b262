"""Per-token early-exit decoding, greedy and beam search, with a KV cache mmexit manages itself.

At every step each row (a sequence, or one beam of one) runs decoder layers until its exit rule
fires. Rows that stopped are gathered out before the next layer runs; the survivors' cache rows
are read with an index. The rule sees the rows still active (``ExitRule.start`` once per token,
``subset_state`` when rows leave). The last exit always stops.

Layers a row skipped have no key/value entry for that position, which later tokens attend to.
Policies (``policy``):
- ``propagate`` (default, CALM's state propagation): for every skipped layer, K/V at this
  position are computed from the exit's hidden state with that layer's own ``ln_1`` and the K/V
  part of ``attn.c_attn`` (no attention, no MLP). This cost is not counted in the layer
  speed-up (it is about 2/16 of a layer); the wall-clock efficiency shows it.
- ``deferred`` (FREE-style deferred compute): a row that exits at layer k keeps the position's
  hidden state; when a later token of that row runs layer j, every position still waiting at
  layer j runs it *together with* that token (one causal chunk), which writes their true K/V.
  The cache is therefore exact (the K/V the full model would have), so the tokens equal those of
  ``oracle``; the catch-up work is real and counted (``DecodeResult.catchup_layers``).
- ``oracle``: every row runs every layer (true K/V everywhere), the rule is applied to the
  exits afterwards and the token comes from the exit where it fired. Costs are *simulated*.

The cache is preallocated ([rows, heads, max_len, head_dim] per layer); cross-attention K/V are
computed once from the image features. Rows that finish (EOS) are compacted out of the cache, so a
step without exits reads the cache with plain slices (the full-model path: ``rule=None``, which
evaluates no internal exit head). ``UncachedStepper`` recomputes the whole prefix through
transformers' own ``GPT2Block.forward`` every step: the reference the cached path is tested
against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmexit.exits.base import ExitRule, ExitView, subset_state

POLICIES = ("propagate", "deferred", "oracle")


@dataclass
class DecodeResult:
    """tokens: per input row, generated ids (EOS included when produced, BOS excluded).

    layers: [row_steps] layers each computed row ran at each step (beam: every beam row);
    exit_index: [row_steps] index of the exit each row-step stopped at;
    token_layers: per input row, layers run for each generated token (greedy only);
    catchup_layers: layer computations of earlier positions caught up under ``deferred``
    (position x layer; 0 under the other policies);
    step_layers: per decoding step of a batch, the layers its deepest row ran: the number of
    layer calls, which sets the step's time when a call costs the same for 1 or 16 rows.
    """

    tokens: list[list[int]]
    layers: Tensor
    exit_index: Tensor
    token_layers: list[list[int]] = field(default_factory=list)
    simulated: bool = False
    catchup_layers: int = 0
    step_layers: list[int] = field(default_factory=list)


class DecoderCache:
    """Self-attention K/V [rows, heads, max_len, head_dim] per layer + cross-attention K/V per layer.

    With ``deferred``: depth [rows, max_len] (layers whose K/V are true at each position) and
    waiting [rows, max_len, width] (hidden state of a position whose depth < num_layers).
    """

    def __init__(self, model, features: Tensor, max_len: int, deferred: bool = False) -> None:
        config = model.decoder.config
        rows, width = features.shape[0], config.n_embd
        self.num_heads = config.n_head
        self.head_dim = width // self.num_heads
        shape = (rows, self.num_heads, max_len, self.head_dim)
        self.keys = [features.new_zeros(shape) for _ in model.blocks]
        self.values = [features.new_zeros(shape) for _ in model.blocks]
        self.cross_keys, self.cross_values = [], []
        for block in model.blocks:
            key, value = block.crossattention.c_attn(features).split(width, dim=-1)  # [rows, patches, width]
            self.cross_keys.append(self._heads(key))
            self.cross_values.append(self._heads(value))
        self.depth: Optional[Tensor] = None
        self.waiting: Optional[Tensor] = None
        if deferred:
            self.depth = torch.full((rows, max_len), len(model.blocks), dtype=torch.long, device=features.device)
            self.waiting = features.new_zeros(rows, max_len, width)

    def _heads(self, tensor: Tensor) -> Tensor:
        rows, patches, _ = tensor.shape
        return tensor.view(rows, patches, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def select(self, index: Tensor) -> None:
        """Keep / reorder the cache rows ``index`` (bool mask or long index [rows])."""
        for store in (self.keys, self.values, self.cross_keys, self.cross_values):
            for layer, tensor in enumerate(store):
                store[layer] = tensor[index]
        if self.depth is not None:
            self.depth, self.waiting = self.depth[index], self.waiting[index]


def _cached_layer(block, hidden: Tensor, cache: DecoderCache, layer: int, rows: Optional[Tensor], t: int) -> Tensor:
    """One GPT2Block for one new position; hidden [r, width]; rows: cache rows of hidden (None = all)."""
    r, width = hidden.shape
    heads, head_dim = cache.num_heads, cache.head_dim
    attention = block.attn
    query, key, value = attention.c_attn(block.ln_1(hidden)).split(width, dim=-1)
    if rows is None:
        cache.keys[layer][:, :, t] = key.view(r, heads, head_dim)
        cache.values[layer][:, :, t] = value.view(r, heads, head_dim)
        keys, values = cache.keys[layer][:, :, : t + 1], cache.values[layer][:, :, : t + 1]
        cross_keys, cross_values = cache.cross_keys[layer], cache.cross_values[layer]
    else:
        cache.keys[layer][rows, :, t] = key.view(r, heads, head_dim)
        cache.values[layer][rows, :, t] = value.view(r, heads, head_dim)
        keys, values = cache.keys[layer][rows, :, : t + 1], cache.values[layer][rows, :, : t + 1]
        cross_keys, cross_values = cache.cross_keys[layer][rows], cache.cross_values[layer][rows]
    out = F.scaled_dot_product_attention(query.view(r, heads, 1, head_dim), keys, values, scale=attention.scaling)
    hidden = hidden + attention.c_proj(out.reshape(r, width))  # [r, heads, 1, hd] -> [r, width]
    cross = block.crossattention
    query = cross.q_attn(block.ln_cross_attn(hidden)).view(r, heads, 1, head_dim)
    out = F.scaled_dot_product_attention(query, cross_keys, cross_values, scale=cross.scaling)
    hidden = hidden + cross.c_proj(out.reshape(r, width))
    return hidden + block.mlp(block.ln_2(hidden))


def _chunk_layer(block, hidden: Tensor, cache: DecoderCache, layer: int, row_ids: Tensor, t: int,
                 waiting: Tensor) -> tuple[Tensor, int]:
    """One GPT2Block for position t plus the positions waiting at this layer, as one causal chunk.

    hidden [r, width] (position t); row_ids [r] cache rows; waiting [r, t] bool (positions < t
    whose depth == layer). Their K/V at this layer are written, their hidden states and depth
    advance by one layer. Returns (hidden of position t [r, width], positions caught up).
    """
    r, width = hidden.shape
    heads, head_dim = cache.num_heads, cache.head_dim
    counts = waiting.sum(1)  # [r]
    c = int(counts.max())
    order = torch.arange(t, device=hidden.device).expand(r, t)
    order = torch.where(waiting, order, order + t).sort(dim=1).values[:, :c]  # waiting positions first, ascending
    valid = torch.arange(c, device=hidden.device)[None, :] < counts[:, None]  # [r, c]
    past = torch.where(valid, order, torch.full_like(order, t))  # padding points at t (outputs discarded)
    positions = torch.cat([past, torch.full((r, 1), t, dtype=torch.long, device=hidden.device)], dim=1)  # [r, c+1]
    chunk = torch.cat([cache.waiting[row_ids[:, None], past], hidden[:, None]], dim=1)  # [r, c+1, width]
    write = torch.cat([valid, torch.ones(r, 1, dtype=torch.bool, device=hidden.device)], dim=1)
    write_rows, write_positions = row_ids[:, None].expand(r, c + 1)[write], positions[write]
    attention = block.attn
    query, key, value = attention.c_attn(block.ln_1(chunk)).split(width, dim=-1)  # [r, c+1, width]
    cache.keys[layer][write_rows, :, write_positions] = key[write].view(-1, heads, head_dim)
    cache.values[layer][write_rows, :, write_positions] = value[write].view(-1, heads, head_dim)
    keys, values = cache.keys[layer][row_ids, :, : t + 1], cache.values[layer][row_ids, :, : t + 1]
    mask = torch.arange(t + 1, device=hidden.device)[None, None, None, :] <= positions[:, None, :, None]
    query = query.view(r, c + 1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=attention.scaling)
    chunk = chunk + attention.c_proj(out.transpose(1, 2).reshape(r, c + 1, width))
    cross = block.crossattention
    query = cross.q_attn(block.ln_cross_attn(chunk)).view(r, c + 1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, cache.cross_keys[layer][row_ids], cache.cross_values[layer][row_ids],
                                         scale=cross.scaling)
    chunk = chunk + cross.c_proj(out.transpose(1, 2).reshape(r, c + 1, width))
    chunk = chunk + block.mlp(block.ln_2(chunk))
    done_rows, done_positions = row_ids[:, None].expand(r, c)[valid], past[valid]
    cache.waiting[done_rows, done_positions] = chunk[:, :c][valid]
    cache.depth[done_rows, done_positions] = layer + 1
    return chunk[:, c], int(counts.sum())


def _propagate(model, cache: DecoderCache, exited: list[tuple[Tensor, Tensor, int]], t: int) -> None:
    """Fill K/V of skipped layers at position t from each exited row's hidden state (CALM)."""
    width = model.decoder.config.n_embd
    heads, head_dim = cache.num_heads, cache.head_dim
    first = min(layer for _, _, layer in exited)
    for layer in range(first, model.num_layers):  # 0-based layer `layer` was skipped by rows with exit <= layer
        parts = [(rows, hidden) for rows, hidden, exit_layer in exited if exit_layer <= layer]
        rows = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
        hidden = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        block = model.blocks[layer]
        projection = block.attn.c_attn  # Conv1D: x @ weight + bias, weight [width, 3 * width]
        key_value = torch.addmm(projection.bias[width:], block.ln_1(hidden), projection.weight[:, width:])
        key, value = key_value.split(width, dim=-1)
        n = hidden.shape[0]
        cache.keys[layer][rows, :, t] = key.view(n, heads, head_dim)
        cache.values[layer][rows, :, t] = value.view(n, heads, head_dim)


class CachedStepper:
    """Advances every row of its cache by one token with per-row early exit."""

    def __init__(self, model, features: Tensor, rule: Optional[ExitRule], max_len: int, policy: str = "propagate") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.model, self.rule, self.policy = model, rule, policy
        self.cache = DecoderCache(model, features, max_len, deferred=policy == "deferred")
        self.exit_of_layer = {layer: index for index, layer in enumerate(model.exits)}
        self.catchup_layers = 0  # deferred: positions x layers caught up so far
        self.needs_logits = rule is None or rule.needs_logits
        self.vocab_size = model.decoder.config.vocab_size
        self._maybe_waiting = False  # deferred: some position may still wait for deeper layers

    def select(self, index: Tensor) -> None:
        self.cache.select(index)

    def step(self, tokens: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """tokens [R] at position t -> (logits [R, vocab] of each row's exit, layers run [R] long)."""
        model, rule = self.model, self.rule
        num_layers, num_exits = model.num_layers, model.num_exits
        total = tokens.shape[0]
        device = tokens.device
        hidden = model.embed(tokens, torch.tensor(t, device=device))  # [R, width]
        layers_out = torch.full((total,), num_layers, dtype=torch.long, device=device)
        logits_out: Optional[Tensor] = None
        rows: Optional[Tensor] = None  # cache rows of `hidden`'s rows (None: all, in order)
        state = rule.start(total, device) if rule is not None else {}
        oracle = self.policy == "oracle"
        undecided = torch.ones(total, dtype=torch.bool, device=device) if oracle else None
        exited: list[tuple[Tensor, Tensor, int]] = []
        depth = None  # deferred: [R, t] depth of earlier positions, when some still wait
        if self.policy == "deferred" and self._maybe_waiting and t > 0:
            depth = self.cache.depth[:, :t].clone()
            self._maybe_waiting = bool((depth < num_layers).any())
            depth = depth if self._maybe_waiting else None
        for index, block in enumerate(model.blocks):
            waiting = None
            if depth is not None:
                # rows still running have run layers 0..index-1 in this step: every position that
                # started this step at depth <= index is now waiting at layer `index`
                waiting = (depth if rows is None else depth[rows]) <= index  # [r, t]
                waiting = waiting if bool(waiting.any()) else None
            if waiting is None:
                hidden = _cached_layer(block, hidden, self.cache, index, rows, t)
            else:
                row_ids = torch.arange(total, device=device) if rows is None else rows
                hidden, caught_up = _chunk_layer(block, hidden, self.cache, index, row_ids, t, waiting)
                self.catchup_layers += caught_up
            layer = index + 1
            if layer == num_layers or rule is None or layer not in self.exit_of_layer:
                continue
            exit_index = self.exit_of_layer[layer]
            logits = model.exit_logits(hidden, exit_index) if self.needs_logits else None
            stop = rule.decide(ExitView(logits, exit_index, num_exits, hidden), state)
            if logits_out is None:
                logits_out = hidden.new_empty(total, self.vocab_size)
            if oracle:  # every row keeps running; record where the rule fired first
                newly = stop & undecided
                logits_out[newly] = logits[newly] if logits is not None else model.exit_logits(hidden[newly], exit_index)
                layers_out[newly] = layer
                undecided &= ~stop
                continue
            count = int(stop.sum())
            if count == 0:
                continue
            current = torch.arange(total, device=device) if rows is None else rows
            stopped = current[stop]
            logits_out[stopped] = logits[stop] if logits is not None else model.exit_logits(hidden[stop], exit_index)
            layers_out[stopped] = layer
            if self.policy == "propagate":
                exited.append((stopped, hidden[stop], layer))
            elif self.policy == "deferred":
                self.cache.waiting[stopped, t] = hidden[stop]
                self.cache.depth[stopped, t] = layer
                self._maybe_waiting = True
            if count == hidden.shape[0]:
                hidden = None
                break
            keep = ~stop
            hidden, rows = hidden[keep], current[keep]
            state = subset_state(state, keep)
        if hidden is not None:
            final = model.exit_logits(hidden, num_exits - 1)
            if logits_out is None:
                logits_out = final
            elif oracle:
                logits_out[undecided] = final[undecided]
            else:
                logits_out[rows] = final
        if exited:
            _propagate(model, self.cache, exited, t)
        return logits_out, layers_out


class UncachedStepper:
    """Reference: recompute the whole prefix each step through ``GPT2Block.forward``.

    Under ``propagate``, positions that exited earlier keep their exit hidden state in deeper
    layers (so deeper K/V come from it); under ``oracle`` and ``deferred`` (whose cache is exact)
    every position runs every layer.
    """

    def __init__(self, model, features: Tensor, rule: Optional[ExitRule], max_len: int, policy: str = "propagate") -> None:
        self.model, self.rule, self.policy, self.features = model, rule, policy, features
        rows = features.shape[0]
        self.prefix = torch.zeros(rows, 0, dtype=torch.long, device=features.device)
        self.ran = torch.zeros(rows, 0, dtype=torch.long, device=features.device)  # layers run per position
        self.exit_of_layer = {layer: index for index, layer in enumerate(model.exits)}
        self.catchup_layers = 0

    def select(self, index: Tensor) -> None:
        self.features, self.prefix, self.ran = self.features[index], self.prefix[index], self.ran[index]

    def step(self, tokens: Tensor, t: int) -> tuple[Tensor, Tensor]:
        model, rule = self.model, self.rule
        num_layers, num_exits = model.num_layers, model.num_exits
        total, device = tokens.shape[0], tokens.device
        ids = torch.cat([self.prefix, tokens[:, None]], dim=1)  # [R, t+1]
        hidden = model.embed(ids, torch.arange(t + 1, device=device))
        ran = torch.cat([self.ran, torch.full((total, 1), num_layers, dtype=torch.long, device=device)], dim=1)
        layers_out = torch.full((total,), num_layers, dtype=torch.long, device=device)
        undecided = torch.ones(total, dtype=torch.bool, device=device)
        state = rule.start(total, device) if rule is not None else {}
        logits_out = None
        for index, block in enumerate(model.blocks):
            new = block(hidden, None, None, self.features)  # causal self-attn (sdpa), cross-attn to image
            hidden = torch.where((ran > index)[..., None], new, hidden)
            layer = index + 1
            if layer == num_layers or rule is None or layer not in self.exit_of_layer:
                continue
            exit_index = self.exit_of_layer[layer]
            logits = model.exit_logits(hidden[:, -1], exit_index)
            stop = rule.decide(ExitView(logits, exit_index, num_exits, hidden[:, -1]), state) & undecided
            if logits_out is None:
                logits_out = logits.new_empty(total, logits.shape[-1])
            logits_out[stop] = logits[stop]
            layers_out[stop] = layer
            if self.policy == "propagate":
                ran[stop, -1] = layer
            undecided &= ~stop
        final = model.exit_logits(hidden[:, -1], num_exits - 1)
        if logits_out is None:
            logits_out = final
        else:
            logits_out[undecided] = final[undecided]
        self.prefix, self.ran = ids, ran
        return logits_out, layers_out


def _stepper(model, features, rule, max_len, policy, cached):
    cls = CachedStepper if cached else UncachedStepper
    return cls(model, features, rule, max_len, policy)


def _exit_positions(model, layers: Tensor) -> Tensor:
    lookup = torch.full((model.num_layers + 1,), -1, dtype=torch.long)
    for index, layer in enumerate(model.exits):
        lookup[layer] = index
    return lookup[layers.cpu()]


@torch.inference_mode()
def greedy_decode(model, features: Tensor, rule: Optional[ExitRule] = None, max_len: int = 20,
                  bos_id: int = 1, eos_id: int = 2, policy: str = "propagate", cached: bool = True) -> DecodeResult:
    """Greedy captions for features [B, patches, width]; rule None = the full model (no internal heads)."""
    batch, device = features.shape[0], features.device
    stepper = _stepper(model, features, rule, max_len, policy, cached)
    out_tokens = torch.full((batch, max_len), -1, dtype=torch.long)
    out_layers = torch.zeros(batch, max_len, dtype=torch.long)
    alive = torch.arange(batch)
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    step_layers = []
    for t in range(max_len):
        logits, layers = stepper.step(tokens, t)
        next_tokens = logits.argmax(-1)
        out_tokens[alive, t] = next_tokens.cpu()
        out_layers[alive, t] = layers = layers.cpu()
        step_layers.append(int(layers.max()))
        done = next_tokens == eos_id
        if bool(done.any()):
            keep = ~done
            stepper.select(keep)
            alive, next_tokens = alive[keep.cpu()], next_tokens[keep]
            if alive.numel() == 0:
                break
        tokens = next_tokens
    valid = out_tokens >= 0
    tokens_list = [row[mask].tolist() for row, mask in zip(out_tokens, valid)]
    layer_list = [row[mask].tolist() for row, mask in zip(out_layers, valid)]
    flat = out_layers[valid]
    return DecodeResult(tokens_list, flat, _exit_positions(model, flat), layer_list, simulated=policy == "oracle",
                        catchup_layers=stepper.catchup_layers, step_layers=step_layers)


@torch.inference_mode()
def beam_decode(model, features: Tensor, rule: Optional[ExitRule] = None, beam_size: int = 3, max_len: int = 20,
                bos_id: int = 1, eos_id: int = 2, length_penalty: float = 1.0, policy: str = "propagate",
                cached: bool = True) -> DecodeResult:
    """Beam search with per-beam early exit; the best finished hypothesis per image.

    Each beam is a row of the cache; after each step the cache rows are reordered to the beams'
    origins. An EOS among the first ``beam_size`` candidates finishes a hypothesis (score /
    length ** length_penalty); an image is done when it has ``beam_size`` finished hypotheses
    (early stopping); at ``max_len`` its live beams are finished as they are.
    """
    batch, device = features.shape[0], features.device
    k = beam_size
    stepper = _stepper(model, features.repeat_interleave(k, dim=0), rule, max_len, policy, cached)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    history = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
    images = list(range(batch))  # images alive, in cache order (k rows each)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    tokens = torch.full((batch * k,), bos_id, dtype=torch.long, device=device)
    all_layers, step_layers = [], []
    for t in range(max_len):
        logits, layers = stepper.step(tokens, t)
        all_layers.append(layers.cpu())
        step_layers.append(int(all_layers[-1].max()))
        n = len(images)
        log_probs = logits.float().log_softmax(-1)
        vocab = log_probs.shape[-1]
        candidates = (scores.view(n, k, 1) + log_probs.view(n, k, vocab)).view(n, k * vocab)
        top_scores, top_index = candidates.topk(2 * k, dim=1)  # [n, 2k]
        origins, words = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        top_list = top_scores.tolist()
        new_scores, new_rows, new_words, keep_images = [], [], [], []
        for j in range(n):
            image, chosen = images[j], 0
            row_scores, row_rows, row_words = [], [], []
            for rank in range(2 * k):
                origin, word, score = origins[j][rank], words[j][rank], top_list[j][rank]
                if word == eos_id:
                    if rank < k and score > float("-inf"):
                        hypothesis = history[j * k + origin].tolist() + [eos_id]
                        finished[image].append((score / len(hypothesis) ** length_penalty, hypothesis))
                    continue
                row_scores.append(score)
                row_rows.append(j * k + origin)
                row_words.append(word)
                chosen += 1
                if chosen == k:
                    break
            if len(finished[image]) >= k:
                continue
            keep_images.append(j)
            new_scores.append(row_scores)
            new_rows.extend(row_rows)
            new_words.extend(row_words)
        if not keep_images:
            images = []
            break
        row_index = torch.tensor(new_rows, dtype=torch.long, device=device)
        stepper.select(row_index)
        history = torch.cat([history[row_index], torch.tensor(new_words, device=device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=device)
        images = [images[j] for j in keep_images]
        tokens = torch.tensor(new_words, dtype=torch.long, device=device)
    for j, image in enumerate(images):  # out of length: live beams finish as they are
        for beam in range(k):
            hypothesis = history[j * k + beam].tolist()
            score = float(scores[j, beam])
            if hypothesis and score > float("-inf"):
                finished[image].append((score / len(hypothesis) ** length_penalty, hypothesis))
    best = [max(hyps, key=lambda item: item[0])[1] if hyps else [] for hyps in finished]
    flat = torch.cat(all_layers) if all_layers else torch.zeros(0, dtype=torch.long)
    return DecodeResult(best, flat, _exit_positions(model, flat), [], simulated=policy == "oracle",
                        catchup_layers=stepper.catchup_layers, step_layers=step_layers)
