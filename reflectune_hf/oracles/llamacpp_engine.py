"""llama.cpp's batched decoding for `LlamaCppOracle`: one model and context, many sequences, continuous batching.

`LlamaEngine` holds a llama.cpp model and context (`n_seq` sequences, each with its own KV
stream of `n_ctx` cells, `n_threads` threads, freed on `close()` or garbage collection).
`run_sequences` decodes a list of `Sequence`s on it: each `llama_decode` call carries the next
token of every running sequence and then prompt tokens of newly admitted ones (up to `n_batch`
tokens in all); a sequence that ends (an end-of-generation token, a stopped format matcher, its
budget) is reported by `on_done`, its KV cells are removed and its slot goes to the next waiting
sequence.

Prompts are prefilled once per engine: when a prompt's last token has been decoded, its KV cells
and its logits are kept in host memory (`PromptStates`, least recently used first out past
`prompt_cache_mb`), and a sequence admitted later with the same prompt ids (a stage's re-ask;
not the `n` copies of one request, admitted together) starts from them: no prefill, and the same
cells and logits as its own prefill would give (a prompt's prefill does not depend on what shares
its batch).

The format masks of all constrained sequences of a step are filled by llguidance in one
parallel call (`LLExecutor`) into one bitmask, applied to the numpy logits of those rows.

Example:
    >>> from reflectune_hf.models import gguf_path, load_tokenizer, resolve_model
    >>> from reflectune_hf.oracles.llamacpp_engine import LlamaEngine, Sequence, run_sequences
    >>> engine = LlamaEngine(gguf_path("smollm2-135m-instruct"), n_ctx=512, n_seq=2, n_threads=1)
    >>> tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    >>> text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    >>> ids = tok(text, add_special_tokens=False)["input_ids"]
    >>> done = []
    >>> run_sequences(engine, [Sequence(0, 0, list(ids), budget=4)], eos={tok.eos_token_id}, on_done=done.append)
    >>> len(done[0].tokens) <= 4 and done[0].reason in ("stop", "length")
    True
"""

from __future__ import annotations

import ctypes
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .llamacpp_logs import quiet_c_output, route_llama_logs


class LlamaEngine:
    """A llama.cpp model and context for batched decoding of up to `n_seq` sequences.

    Args:
        path: the GGUF file.
        n_ctx: cells per sequence (prompt + answer); capped at the model's training context.
        n_seq: sequences decoded together.
        n_threads: llama.cpp threads of this context.
        n_batch: tokens per `llama_decode` call.
        prompt_cache_mb: host memory for prefilled prompts (`PromptStates`); 0 keeps none.
    """

    def __init__(self, path, n_ctx: int = 2048, n_seq: int = 16, n_threads: int = 1, n_batch: int = 512,
                 prompt_cache_mb: float = 512):
        import llama_cpp

        route_llama_logs(llama_cpp)
        self._lib = llama_cpp
        with quiet_c_output() as output:  # what llama.cpp prints while loading: shown only if it fails
            llama_cpp.llama_backend_init()
            model = llama_cpp.llama_model_load_from_file(str(Path(path)).encode(),
                                                         llama_cpp.llama_model_default_params())
        if not model:
            raise ValueError(f"llama.cpp cannot load {path}: {output.tail()}")
        self._model = model
        n_ctx = min(int(n_ctx), int(llama_cpp.llama_model_n_ctx_train(model)))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx * n_seq, n_seq, False
        n_batch = max(int(n_batch), n_seq + 1)
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads
        with quiet_c_output() as output:
            ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            self.close()
            raise ValueError(f"llama.cpp cannot create a context of {n_seq} x {n_ctx} tokens for {path}: "
                             f"{output.tail()}")
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab, self.eos = int(llama_cpp.llama_vocab_n_tokens(vocab)), int(llama_cpp.llama_vocab_eos(vocab))
        # Every end-of-generation token (EOS, end of turn, ...), as llama.cpp's own server stops on.
        self.eog = frozenset(i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i))
        self.n_ctx, self.n_seq, self.n_batch, self.n_threads = n_ctx, n_seq, n_batch, n_threads
        self.step_times: Optional[StepTimes] = None  # set one to time `run_sequences`' steps (benchmarks)
        self.prompt_states = PromptStates(int(prompt_cache_mb * (1 << 20)))

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
        self._batch = self._ctx = self._model = self._lib = None
        if getattr(self, "prompt_states", None) is not None:
            self.prompt_states.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def reset(self) -> None:
        """Remove every sequence's KV cells (after an interrupted decode)."""
        self._lib.llama_memory_clear(self._memory, True)

    def forget(self, seq_id: int) -> None:
        """Remove every KV cell of sequence `seq_id`."""
        self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def save(self, seq_id: int) -> bytes:
        """The KV cells of sequence `seq_id` (llama.cpp's sequence state), as bytes."""
        lib = self._lib
        size = lib.llama_state_seq_get_size(self._ctx, seq_id)
        buffer = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(self._ctx, buffer, size, seq_id)
        return ctypes.string_at(buffer, written)

    def restore(self, seq_id: int, state: bytes) -> bool:
        """Load cells saved by `save` into sequence `seq_id` (its own cells removed first);
        False, with the sequence left empty, where llama.cpp refuses them."""
        self.forget(seq_id)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self._lib.llama_state_seq_set_data(self._ctx, buffer, len(state), seq_id) == len(state):
            return True
        self.forget(seq_id)
        return False

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> int:
        """One `llama_decode` of `(token, position, seq_id, wants_logits)` entries; llama.cpp's code."""
        batch = self._batch
        for k, (token, pos, seq, logits) in enumerate(entries):
            batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, pos, 1
            batch.seq_id[k][0], batch.logits[k] = seq, int(logits)
        batch.n_tokens = len(entries)
        return int(self._lib.llama_decode(self._ctx, batch))

    def logits(self, k: int):
        """The logits of batch entry `k` of the last `decode` (a float32 copy)."""
        pointer = self._lib.llama_get_logits_ith(self._ctx, k)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()


@dataclass
class StepTimes:
    """Seconds per section of each `run_sequences` step, recorded while `engine.step_times` holds
    one: `steps` rows of `(entries, rows, constrained, decode, logits, mask, apply, choose)` -
    tokens in the `llama_decode` call, rows with logits, rows under a format mask, then the
    seconds of `llama_decode`, the logits copies, the llguidance mask fill, applying the masks,
    and choosing/consuming the tokens (bookkeeping included)."""

    steps: list = field(default_factory=list)

    SECTIONS = ("decode", "logits", "mask", "apply", "choose")

    def generation_steps(self) -> list:
        """The steps that carried only next tokens (no prompt tokens): their cost depends on the
        number of running rows alone."""
        return [s for s in self.steps if s[0] == s[1]]


class PromptStates:
    """Prefilled prompts of one engine: prompt ids -> (KV cells from `LlamaEngine.save`, the
    logits of the prompt's last token), least recently used first out past `max_bytes`.

    Example:
        >>> import numpy as np
        >>> from reflectune_hf.oracles.llamacpp_engine import PromptStates
        >>> states = PromptStates(max_bytes=100)
        >>> states.put([1, 2], b"x" * 40, np.zeros(4, dtype=np.float32)); states.put([3], b"y" * 60, np.zeros(4))
        >>> states.get([1, 2]) is None, states.get([3])[0][:1], len(states)  # [1, 2] made room for [3]
        (True, b'y', 1)
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self._states: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, prompt: list) -> Optional[tuple]:
        key = tuple(prompt)
        if key not in self._states:
            return None
        self._states.move_to_end(key)
        return self._states[key]

    def __iter__(self):
        """The kept prompts (tuples of token ids), least recently used first."""
        return iter(list(self._states))

    def put(self, prompt: list, cells: bytes, logits) -> None:
        """Keep `prompt`'s state (replacing one kept before), evicting the least recently used
        past `max_bytes`; a state larger than `max_bytes` is not kept."""
        key, size = tuple(prompt), len(cells) + logits.nbytes
        self._drop(key)
        if size > self.max_bytes:
            return
        while self._states and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._states)))
        self._states[key] = (cells, logits)
        self.bytes += size

    def _drop(self, key: tuple) -> None:
        if key in self._states:
            cells, logits = self._states.pop(key)
            self.bytes -= len(cells) + logits.nbytes

    def clear(self) -> None:
        self._states.clear()
        self.bytes = 0


@dataclass
class Sequence:
    """One answer to decode: its prompt ids, budget and sampling setting; filled in as it runs
    (`tokens`, `reason` "stop"/"length", `logprobs` as `(token, logprob, [(alt, logprob)])`, or
    `error`)."""

    request: int
    copy: int
    prompt: list
    budget: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    top_logprobs: Optional[int] = None
    matcher: object = None
    tokens: list = field(default_factory=list)
    reason: Optional[str] = None
    logprobs: Optional[list] = None
    error: Optional[str] = None


def _choose(logits, seq: Sequence, rng) -> int:
    if seq.temperature == 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / seq.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if seq.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = np.searchsorted(np.cumsum(probs[order]), seq.top_p) + 1  # smallest set reaching top_p
        kept = np.zeros_like(probs)
        kept[order[:keep]] = probs[order[:keep]]
        probs = kept / kept.sum()
    return int(rng.choice(probs.shape[0], p=probs))


def _log_softmax(logits):
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def run_sequences(engine: LlamaEngine, sequences: list[Sequence], *, eos: set,
                  on_done: Callable[[Sequence], None]) -> None:
    """Decode `sequences` on `engine` (continuous batching); `on_done(seq)` as each one ends."""
    engine.reset()  # nothing left over from an interrupted call
    queue = list(reversed(sequences))
    free = list(range(engine.n_seq - 1, -1, -1))
    running: dict[int, dict] = {}  # seq_id -> {"seq", "pos", "fed" (prompt tokens sent), "next"}
    executor = bitmask = None
    if any(s.matcher is not None for s in sequences):
        import llguidance

        executor = llguidance.LLExecutor()
        bitmask = np.full((engine.n_seq, (engine.n_vocab + 31) // 32), -1, dtype=np.int32)

    def end(seq_id: int, reason: Optional[str] = None, error: Optional[str] = None) -> None:
        seq = running.pop(seq_id)["seq"]
        seq.reason, seq.error = reason, error
        engine.forget(seq_id)
        free.append(seq_id)
        on_done(seq)

    while queue or running:
        restored = []  # (seq_id, logits) of sequences that start from a kept prompt
        while queue and free:
            seq, seq_id = queue.pop(), free.pop()
            seq.logprobs = [] if seq.top_logprobs is not None else None
            seed = None if seq.seed is None else seq.seed % (1 << 64)  # a negative seed as torch takes it
            rng = np.random.default_rng(seed) if seq.temperature > 0 else None
            running[seq_id] = {"seq": seq, "pos": 0, "fed": 0, "next": None, "rng": rng}
            kept = engine.prompt_states.get(seq.prompt)
            if kept is not None and engine.restore(seq_id, kept[0]):
                running[seq_id].update(pos=len(seq.prompt), fed=len(seq.prompt))
                restored.append((seq_id, kept[1]))
        entries, outputs, prompt_ends = [], [], set()  # outputs: (seq_id, batch entry)
        for seq_id, state in running.items():
            if state["next"] is not None:
                outputs.append((seq_id, len(entries)))
                entries.append((state["next"], state["pos"], seq_id, True))
                state["pos"] += 1
        for seq_id, state in running.items():
            prompt = state["seq"].prompt
            room = engine.n_batch - len(entries)
            if state["next"] is not None or state["fed"] == len(prompt) or room <= 0:
                continue
            take = min(room, len(prompt) - state["fed"])
            for k in range(state["fed"], state["fed"] + take):
                entries.append((prompt[k], k, seq_id, k == len(prompt) - 1))
            state["fed"] += take
            state["pos"] = state["fed"]
            if state["fed"] == len(prompt):
                outputs.append((seq_id, len(entries) - 1))
                prompt_ends.add(seq_id)
        clock = time.perf_counter if engine.step_times is not None else None
        t0 = clock() if clock else 0.0
        code = engine.decode(entries) if entries else 0
        t1 = clock() if clock else 0.0
        if code != 0:
            for seq_id in list(running):
                end(seq_id, error=f"llama_decode failed (code {code}) with {len(running)} sequences running")
            continue
        rows = [(seq_id, engine.logits(k)) for seq_id, k in outputs]
        for seq_id, logits in rows:
            if seq_id in prompt_ends and engine.prompt_states.max_bytes:
                engine.prompt_states.put(running[seq_id]["seq"].prompt, engine.save(seq_id), logits)
        rows += restored
        t2 = clock() if clock else 0.0
        constrained = [(running[s]["seq"].matcher, slot) for slot, (s, _) in enumerate(rows)
                       if running[s]["seq"].matcher is not None]
        if constrained:
            from llguidance.numpy import fill_next_token_bitmask_par

            fill_next_token_bitmask_par(executor, constrained, bitmask[:len(rows)])
        t3 = clock() if clock else 0.0
        if constrained:
            allowed = np.unpackbits(bitmask[:len(rows)].view(np.uint8), axis=1, bitorder="little").view(bool)
        t_apply = (clock() - t3) if clock else 0.0
        for slot, (seq_id, logits) in enumerate(rows):
            state = running[seq_id]
            seq = state["seq"]
            raw = logits
            if seq.matcher is not None:
                ta = clock() if clock else 0.0
                logits = np.where(allowed[slot, :engine.n_vocab], logits, -np.inf)
                t_apply += (clock() - ta) if clock else 0.0
            token = _choose(logits, seq, state["rng"])
            if token in eos:
                end(seq_id, "stop")
                continue
            seq.tokens.append(token)
            if seq.logprobs is not None:
                lp = _log_softmax(raw)
                top = np.argsort(-lp, kind="stable")[:seq.top_logprobs] if seq.top_logprobs else []
                seq.logprobs.append((token, float(lp[token]), [(int(t), float(lp[t])) for t in top]))
            if seq.matcher is not None and (not seq.matcher.consume_token(token) or seq.matcher.is_stopped()):
                end(seq_id, "stop")
            elif len(seq.tokens) >= seq.budget:
                end(seq_id, "length")
            else:
                state["next"] = token
        if clock:
            t4 = clock()
            engine.step_times.steps.append((len(entries), len(rows), len(constrained), t1 - t0, t2 - t1, t3 - t2,
                                            t_apply, t4 - t3 - t_apply))
