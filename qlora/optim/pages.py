"""A pool of fixed-size byte pages that live on the compute device or spill to host memory.

Every page is ``page_bytes`` of raw bytes (the optimizer decides what they mean). At any time a
page is *resident* (a tensor on ``device``) or *spilled* (a host tensor, pinned when ``device``
is CUDA). The budget decides how many pages may be resident; the rest are spilled.

``walk(pages, update)`` hands every listed page to ``update`` as a device tensor. A spilled
page is copied into one of two device slots (a double buffer), updated there and copied back.
On CUDA the copies run on a side stream: while slot A is updated on the compute stream, the
next spilled page is already streaming into slot B, and A's write-back overlaps the update of
B. On CPU (``device`` is the CPU) the same code path runs with synchronous copies between
separate buffers, which keeps the residency logic testable without a GPU.

Transfers are explicit ``copy_`` calls between ordinary allocations: no managed memory.
"""
import contextlib
import time

import torch

# "auto" budget: keep this much device memory free for everything that is not optimizer
# state (activations of the next forward, allocator fragmentation).
AUTO_HEADROOM_FRACTION = 0.10
AUTO_MIN_HEADROOM_BYTES = 1 << 30


def auto_budget_bytes(state_bytes_on_device: int, free_bytes: int, total_bytes: int) -> int:
    """Device bytes the optimizer may hold: what it holds now plus what is free, minus headroom.

    ``free_bytes`` is the driver's free memory (``torch.cuda.mem_get_info``). Blocks cached by
    PyTorch's allocator count as used, so a forward pass whose activations spiked (and stay
    cached) lowers the budget at the next step and pushes pages out.
    """
    headroom = max(AUTO_MIN_HEADROOM_BYTES, int(AUTO_HEADROOM_FRACTION * total_bytes))
    return max(0, state_bytes_on_device + free_bytes - headroom)


def resident_pages(n_pages: int, page_bytes: int, budget_bytes: int) -> int:
    """How many of ``n_pages`` stay on the device under a budget of ``budget_bytes``: all when
    they fit, else as many as fit beside the two-page double buffer the spilled ones stream
    through (the memory estimate places the optimizer's pages with this same rule)."""
    if budget_bytes >= n_pages * page_bytes:
        return n_pages
    return max(0, budget_bytes // page_bytes - 2)


class PagePool:
    """``n_pages`` pages of ``page_bytes`` bytes each, zero-initialised.

    budget: None (every page resident), an int (bytes of device memory for pages, including
    the two-page double buffer once anything spills), or "auto" (``auto_budget_bytes`` of the
    CUDA device, re-evaluated by ``begin_step()``).
    """

    def __init__(self, n_pages: int, page_bytes: int, device: torch.device, budget=None):
        if budget is not None and budget != "auto" and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"PagePool: budget must be None, 'auto' or bytes >= 0, got {budget!r}")
        if budget == "auto" and device.type != "cuda":
            budget = None  # host memory is the only tier: nothing to spill to
        self.n_pages = n_pages
        self.page_bytes = page_bytes
        self.device = device
        self.budget = budget
        self._cuda = device.type == "cuda"
        self._side_stream = torch.cuda.Stream(device) if self._cuda else None
        self._device_pages = [None] * n_pages
        self._host_pages = [None] * n_pages
        self._slots = []
        self._stall_events = []  # CUDA: (compute wanted the page, page arrived) event pairs
        self._wait_seconds = 0.0
        self._pages_moved = 0
        capacity = self._capacity()
        for i in range(n_pages):
            if i < capacity:
                self._device_pages[i] = torch.zeros(page_bytes, dtype=torch.uint8, device=device)
            else:
                self._host_pages[i] = self._empty_host().zero_()
        self._ensure_slots()

    # ---- placement -------------------------------------------------------------------------
    def _empty_host(self):
        return torch.empty(self.page_bytes, dtype=torch.uint8, pin_memory=self._cuda)

    def _state_bytes_on_device(self):
        return self.page_bytes * (len(self._slots) + sum(p is not None for p in self._device_pages))

    def _capacity(self) -> int:
        """Number of pages the budget lets stay resident."""
        if self.budget is None:
            return self.n_pages
        if self.budget == "auto":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = auto_budget_bytes(self._state_bytes_on_device(), free, total)
        else:
            budget = self.budget
        return resident_pages(self.n_pages, self.page_bytes, budget)

    def _ensure_slots(self):
        spilled = any(p is None for p in self._device_pages)
        if spilled and not self._slots:
            self._slots = [torch.empty(self.page_bytes, dtype=torch.uint8, device=self.device)
                           for _ in range(2)]
        elif not spilled:
            self._slots = []

    def begin_step(self):
        """Reset the per-step counters, then evict or promote pages to fit the budget."""
        self._stall_events = []
        self._wait_seconds = 0.0
        self._pages_moved = 0
        self._rebalance()

    def _rebalance(self):
        # Highest index out first, lowest index in first: the resident set stays a prefix.
        capacity = self._capacity()
        resident = [i for i, p in enumerate(self._device_pages) if p is not None]
        if len(resident) == capacity:
            return
        self.synchronize()
        for i in resident[capacity:]:
            host = self._empty_host()
            host.copy_(self._device_pages[i])
            self._host_pages[i], self._device_pages[i] = host, None
            self._pages_moved += 1
        spilled = [i for i, p in enumerate(self._device_pages) if p is None]
        for i in spilled[:max(0, capacity - len(resident))]:
            page = torch.empty(self.page_bytes, dtype=torch.uint8, device=self.device)
            page.copy_(self._host_pages[i])
            self._device_pages[i], self._host_pages[i] = page, None
            self._pages_moved += 1
        self._ensure_slots()
        if self._cuda and len(resident) > capacity:
            # Hand the evicted pages back to the driver: otherwise they stay in PyTorch's cache,
            # mem_get_info still counts them as used and the next "auto" budget shrinks again.
            torch.cuda.empty_cache()

    def is_resident(self, index: int) -> bool:
        return self._device_pages[index] is not None

    def page(self, index: int) -> torch.Tensor:
        """The bytes of page ``index`` where they live now (call ``synchronize()`` first)."""
        resident = self._device_pages[index]
        return resident if resident is not None else self._host_pages[index]

    def synchronize(self):
        """Wait for in-flight write-backs, so host pages may be read or written directly."""
        if self._cuda:
            self._side_stream.synchronize()

    # ---- the walk --------------------------------------------------------------------------
    def _stream_context(self):
        return torch.cuda.stream(self._side_stream) if self._cuda else contextlib.nullcontext()

    def _fetch(self, index, slot):
        """Start copying spilled page ``index`` into ``slot``; returns its arrival event."""
        start = time.perf_counter()
        with self._stream_context():
            self._slots[slot].copy_(self._host_pages[index], non_blocking=self._cuda)
            arrived = torch.cuda.Event(enable_timing=True) if self._cuda else None
            if arrived is not None:
                arrived.record()
        if not self._cuda:
            self._wait_seconds += time.perf_counter() - start  # nothing overlaps a CPU copy
        self._pages_moved += 1
        return arrived

    def _wait(self, arrived):
        if self._cuda:
            wanted = torch.cuda.Event(enable_timing=True)
            wanted.record()
            torch.cuda.current_stream(self.device).wait_event(arrived)
            self._stall_events.append((wanted, arrived))

    def _write_back(self, index, slot):
        start = time.perf_counter()
        if self._cuda:
            updated = torch.cuda.Event()
            updated.record()
            self._side_stream.wait_event(updated)
        with self._stream_context():
            self._host_pages[index].copy_(self._slots[slot], non_blocking=self._cuda)
        if not self._cuda:
            self._wait_seconds += time.perf_counter() - start
        self._pages_moved += 1

    def walk(self, pages, update):
        """Call ``update(index, device_bytes)`` for each page index in ``pages``.

        Resident pages are updated in place while the first two spilled pages stream in; each
        spilled page is then updated in its slot and written back asynchronously.
        """
        spilled = [i for i in pages if self._device_pages[i] is None]
        arrived = [self._fetch(i, slot) for slot, i in enumerate(spilled[:2])]
        for i in pages:
            if self._device_pages[i] is not None:
                update(i, self._device_pages[i])
        for j, i in enumerate(spilled):
            slot = j % 2
            self._wait(arrived[slot])
            update(i, self._slots[slot])
            self._write_back(i, slot)
            if j + 2 < len(spilled):
                arrived[slot] = self._fetch(spilled[j + 2], slot)

    # ---- accounting ------------------------------------------------------------------------
    def report(self) -> dict:
        """Bytes per tier, pages moved and seconds the update waited for pages since ``begin_step``.

        On CUDA the wait is the time the compute stream stalled on page arrivals (event timing);
        on CPU, where copies are synchronous, it is the time spent copying.
        """
        wait = self._wait_seconds
        if self._cuda:
            for wanted, arrived in self._stall_events:
                arrived.synchronize()
                wait += max(0.0, wanted.elapsed_time(arrived)) / 1000.0
        on_device = sum(p is not None for p in self._device_pages)
        return {
            "device_bytes": self._state_bytes_on_device(),
            "host_bytes": self.page_bytes * (self.n_pages - on_device),
            "pages_on_device": on_device,
            "pages_on_host": self.n_pages - on_device,
            "page_bytes": self.page_bytes,
            "pages_moved_last_step": self._pages_moved,
            "wait_seconds_last_step": wait,
        }
