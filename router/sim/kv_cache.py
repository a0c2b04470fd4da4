"""Paged KV cache with automatic prefix caching, as vLLM v1's block pool does it.

Owns the GPU blocks of one engine (ids, reference counts, the free queue in LRU order), the
map block key → cached GPU block, an optional CPU tier, and the KV events those changes cause.
It knows nothing about requests or scheduling: the engine asks it for prefix hits, blocks,
caching of full blocks and frees.

Semantics kept from vLLM v1 (`vllm/v1/core/block_pool.py`, `kv_cache_utils.py`):
- every free block sits in one queue; allocation pops its head; a popped block that still
  holds a cached key is evicted then (`BlockRemoved`), so cached blocks survive until space is
  needed and go least-recently-freed first;
- a request's blocks are freed tail-first (its last block is evicted before its first);
- a hit on a free cached block takes it out of the queue (ref count 0 → 1);
- only full blocks are cached; a `BlockStored` groups the consecutive blocks cached together,
  with the parent's hash and the blocks' token ids.
Engine hashes are our own chained keys (`router.blocks.token_block_keys`), so replaying the
events into a `BlockIndex` reproduces exactly `cached_keys()`.

Deviation, kept deliberately: when a block is completed whose key another block already caches
(two requests computing the same prefix at once), vLLM keeps both under one hash; here the
second stays uncached, so one key ↔ one block and the event stream stays exact.

Blocks are integer ids with parallel per-id arrays (reference count, cached key), not objects:
a pod has tens of thousands of blocks and a simulation creates many pods, so allocation,
hits and frees must stay a few list operations per block.

The CPU tier is exclusive: a GPU block evicted with a key moves to the CPU tier (`BlockStored`
medium CPU; the CPU tier evicts its own LRU entry with `BlockRemoved` medium CPU); a prefix hit
in the CPU tier moves the block back to GPU (the engine charges the copy time).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from router.events.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

GPU = "GPU"
CPU = "CPU"


class _CpuEntry:
    """What a CPU-tier block needs to be reported again: its chain parent, tokens, LoRA."""

    __slots__ = ("lora", "parent", "tokens")

    def __init__(self, parent: int | None, tokens: np.ndarray | None, lora: str | None) -> None:
        self.parent = parent
        self.tokens = tokens
        self.lora = lora


class KVCache:
    """GPU block pool + prefix cache (+ optional CPU tier) of one engine.

    Block ids are 0..num_gpu_blocks-1; `ref[b]` is block b's reference count and `key[b]` its
    cached key (None when not in the prefix cache).
    """

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int,
        num_cpu_blocks: int = 0,
        emit_events: bool = True,
        enable_prefix_caching: bool = True,
    ) -> None:
        if num_gpu_blocks < 1 or block_size < 1 or num_cpu_blocks < 0:
            raise ValueError("num_gpu_blocks and block_size must be ≥ 1, num_cpu_blocks ≥ 0")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.num_cpu_blocks = num_cpu_blocks
        self.emit_events = emit_events
        self.enable_prefix_caching = enable_prefix_caching
        self.ref: list[int] = [0] * num_gpu_blocks
        self.key: list[int | None] = [None] * num_gpu_blocks
        # vLLM's free queue: the never-used blocks first (ids `_next_unused`..end, in order),
        # then freed blocks in the order they were freed.
        self._next_unused = 0
        self._free: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}  # key → block id
        self._cpu: OrderedDict[int, _CpuEntry] = OrderedDict()
        #: Per cached block, what the CPU tier needs on offload (only with a CPU tier).
        self._meta: dict[int, _CpuEntry] = {}
        self._keep_tokens = emit_events or num_cpu_blocks > 0
        self.events: list[KVEvent] = []
        self.evictions = 0
        self.cpu_evictions = 0

    # ------------------------------------------------------------------ state
    @property
    def num_free(self) -> int:
        return self.num_gpu_blocks - self._next_unused + len(self._free)

    @property
    def num_used(self) -> int:
        return self._next_unused - len(self._free)

    @property
    def num_cached(self) -> int:
        """GPU blocks holding a cached key (in use or free)."""
        return len(self._cached)

    @property
    def keep_tokens(self) -> bool:
        """Whether caching needs the blocks' token ids (for events or the CPU tier)."""
        return self._keep_tokens

    @property
    def usage(self) -> float:
        """Fraction of GPU blocks held by requests (vLLM's kv_cache_usage_perc)."""
        return self.num_used / self.num_gpu_blocks

    def cached_keys(self) -> dict[int, str]:
        """Every cached key → medium ("GPU" or "CPU")."""
        out = dict.fromkeys(self._cpu, CPU)
        out.update(dict.fromkeys(self._cached, GPU))
        return out

    def free_queue(self) -> list[int]:
        """Free block ids in eviction order (head first)."""
        return list(range(self._next_unused, self.num_gpu_blocks)) + list(self._free)

    def drain_events(self) -> list[KVEvent]:
        ev = self.events
        self.events = []
        return ev

    # ------------------------------------------------------------------ read
    def find_prefix(self, keys: Sequence[int], max_blocks: int) -> tuple[list[int], list[int], int]:
        """Longest cached chain of `keys[:max_blocks]`.

        Returns the GPU block ids, then the CPU-tier keys that continue the chain, and how many
        of the GPU blocks sit in the free queue (taking them costs free blocks).
        """
        if not self.enable_prefix_caching:
            return [], [], 0
        get = self._cached.get
        ref = self.ref
        hits: list[int] = []
        append = hits.append
        in_queue = 0
        for k in keys[:max_blocks]:
            b = get(k)
            if b is None:
                break
            append(b)
            if not ref[b]:
                in_queue += 1
        cpu_hits: list[int] = []
        if self._cpu:
            cpu = self._cpu
            i = len(hits)
            n = min(len(keys), max_blocks)
            while i < n and keys[i] in cpu:
                cpu_hits.append(keys[i])
                i += 1
        return hits, cpu_hits, in_queue

    def prefix_blocks(self, keys: Sequence[int]) -> int:
        """How many leading `keys` are cached on GPU."""
        cached = self._cached
        n = 0
        for k in keys:
            if k not in cached:
                break
            n += 1
        return n

    # ----------------------------------------------------------------- write
    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on hit blocks (removing free ones from the queue)."""
        ref = self.ref
        free = self._free
        for b in blocks:
            r = ref[b]
            if not r:
                del free[b]
            ref[b] = r + 1

    def allocate(self, n: int) -> list[int] | None:
        """Pop `n` blocks from the free queue head (evicting their keys), or None if short."""
        fresh = self.num_gpu_blocks - self._next_unused
        if n > fresh + len(self._free):
            return None
        ref = self.ref
        if fresh:
            take = min(n, fresh)
            first = self._next_unused
            out = list(range(first, first + take))
            self._next_unused = first + take
            for b in out:
                ref[b] = 1
            n -= take
            if not n:
                return out
        else:
            out = []
        popitem = self._free.popitem
        key = self.key
        for _ in range(n):
            b, _ = popitem(last=False)
            if key[b] is not None:
                self._evict(b)
            ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop a request's references, tail block first (it is evicted first)."""
        ref = self.ref
        free = self._free
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if not r:
                free[b] = None
            elif r < 0:
                raise AssertionError(f"block {b} freed twice")

    def cache_blocks(
        self,
        blocks: Sequence[int],
        keys: Sequence[int],
        start: int,
        end: int,
        tokens: np.ndarray | None,
        lora: str | None = None,
    ) -> None:
        """Cache the now-full blocks `blocks[start:end]` under `keys[start:end]`.

        `tokens` holds the tokens of exactly those blocks (len = (end-start)·block_size), or
        None when the caller keeps no tokens (no events, no CPU tier).
        """
        if not self.enable_prefix_caching or start >= end:
            return
        cached = self._cached
        cpu = self._cpu
        bkey = self.key
        bs = self.block_size
        meta = self._meta if self.num_cpu_blocks else None
        run_from = -1  # first index of the current run of stored blocks
        for i in range(start, end):
            k = keys[i]
            b = blocks[i]
            if k in cached or bkey[b] is not None:
                if run_from >= 0:
                    self._stored(keys, run_from, i, tokens, start, lora)
                    run_from = -1
                continue
            if cpu and k in cpu:
                self._drop_cpu(k)
            bkey[b] = k
            cached[k] = b
            if meta is not None:
                off = (i - start) * bs
                meta[b] = _CpuEntry(
                    keys[i - 1] if i > 0 else None,
                    None if tokens is None else tokens[off : off + bs],
                    lora,
                )
            if run_from < 0:
                run_from = i
        if run_from >= 0:
            self._stored(keys, run_from, end, tokens, start, lora)

    def allocate_reloading(
        self, n: int, cpu_keys: Sequence[int], parent: int | None
    ) -> list[int] | None:
        """`allocate(n)` whose first blocks receive the CPU-tier `cpu_keys` (moved to GPU).

        The CPU entries are taken out before allocating, so the GPU evictions the allocation
        causes (which offload to the CPU tier) cannot push them out first.
        """
        if n > self.num_free or len(cpu_keys) > n:
            return None
        if not cpu_keys:
            return self.allocate(n)
        entries = [self._cpu.pop(k) for k in cpu_keys]
        if self.emit_events:
            self.events.append(BlockRemoved(block_hashes=list(cpu_keys), medium=CPU))
        blocks = self.allocate(n)
        assert blocks is not None
        toks: list[np.ndarray] = []
        for b, k, e in zip(blocks, cpu_keys, entries, strict=False):
            self.key[b] = k
            self._cached[k] = b
            self._meta[b] = e
            if e.tokens is not None:
                toks.append(e.tokens)
        if self.emit_events:
            self.events.append(
                BlockStored(
                    block_hashes=list(cpu_keys),
                    parent_block_hash=parent,
                    token_ids=np.concatenate(toks).tolist() if toks else [],
                    block_size=self.block_size,
                    medium=GPU,
                    lora_name=entries[0].lora,
                )
            )
        return blocks

    def reset(self) -> bool:
        """Drop every cached key (vLLM's reset_prefix_cache); refused while blocks are in use."""
        if self.num_used:
            return False
        for b in self._cached.values():
            self.key[b] = None
        self._cached.clear()
        self._meta.clear()
        self._cpu.clear()
        if self.emit_events:
            self.events.append(AllBlocksCleared())
        return True

    # --------------------------------------------------------------- private
    def _stored(
        self,
        keys: Sequence[int],
        lo: int,
        hi: int,
        tokens: np.ndarray | None,
        start: int,
        lora: str | None,
    ) -> None:
        if not self.emit_events:
            return
        bs = self.block_size
        tok = [] if tokens is None else tokens[(lo - start) * bs : (hi - start) * bs].tolist()
        self.events.append(
            BlockStored(
                block_hashes=list(keys[lo:hi]),
                parent_block_hash=keys[lo - 1] if lo > 0 else None,
                token_ids=tok,
                block_size=bs,
                medium=GPU,
                lora_name=lora,
            )
        )

    def _evict(self, b: int) -> None:
        k = self.key[b]
        assert k is not None
        del self._cached[k]
        self.key[b] = None
        self.evictions += 1
        if self.emit_events:
            self.events.append(BlockRemoved(block_hashes=[k], medium=GPU))
        if self.num_cpu_blocks:
            e = self._meta.pop(b)
            cpu = self._cpu
            if len(cpu) >= self.num_cpu_blocks:
                old, _ = cpu.popitem(last=False)
                self.cpu_evictions += 1
                if self.emit_events:
                    self.events.append(BlockRemoved(block_hashes=[old], medium=CPU))
            cpu[k] = e
            if self.emit_events:
                self.events.append(
                    BlockStored(
                        block_hashes=[k],
                        parent_block_hash=e.parent,
                        token_ids=[] if e.tokens is None else e.tokens.tolist(),
                        block_size=self.block_size,
                        medium=CPU,
                        lora_name=e.lora,
                    )
                )

    def _drop_cpu(self, k: int) -> None:
        del self._cpu[k]
        if self.emit_events:
            self.events.append(BlockRemoved(block_hashes=[k], medium=CPU))
