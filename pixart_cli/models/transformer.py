"""The PixArt transformer: its skeleton on the meta device (made once a process), and the streamed plan's block
streamer.

The streamed plan (budgets below the transformer's own size) keeps everything but the 28 transformer blocks on the
device, and the blocks in pinned CPU memory, one flat buffer each. Two device slots take turns: while block i runs
from one slot, block i + 1 is copied into the other on a side stream (after block i - 1, which used it, is done),
so the transfer overlaps the compute. Blocks run in order at every step, so the prefetch after the last block
brings the first one in for the next step. The forward pass is diffusers' own (hooks only point a block's
parameters at its slot), so latents equal the resident plan's (tests/test_memory.py).

diffusers' group offloading did this before, at 5.9 s of load (its hooks import torch._dynamo) and 2.9 s an image
on an H200 (issue 19). This needs no import beyond the transformer's own module, and its weights on the device
are the non-block layers plus two blocks (``streamed_bytes``), so the rest of the budget takes more images per
pass through the blocks.
"""

from __future__ import annotations

import functools
import json

from pixart_cli.models import memory

ALIGN = 512  # bytes: each tensor in a block's buffer starts where PyTorch's caching allocator would start it
SLOTS = 2
# Pinned host memory comes in chunks of a power of two: PyTorch's pinned-memory allocator rounds every request up to
# one, so one buffer for PixArt-XL's 28 blocks (1.19 GB) would pin 2 GiB (RSS 3.8 GB against 1.8 GB for the resident
# plan, H200, 2026-12-01); six blocks to a 256 MiB chunk pin 1.25 GiB.
CHUNK = 256 * 2**20


def transformer_module():
    """diffusers' PixArtTransformer2DModel, imported lean."""
    from pixart_cli.models.facade import import_diffusers

    return import_diffusers("diffusers.models.transformers.pixart_transformer_2d").PixArtTransformer2DModel


def skeleton(config: dict, dtype):
    """The transformer of ``config`` on the meta device in ``dtype`` (exact sizes, module names and shapes; no
    weights), made once a process for each config and dtype: the run plan's LoRA check and the denoise plan both
    ask for it. Buffers are computed on the CPU: on the meta device, the position table's factory functions
    import torch._dynamo (2 s of a process, issue 19)."""
    return _skeleton(json.dumps(config, sort_keys=True), dtype)


@functools.lru_cache(maxsize=4)
def _skeleton(config_json: str, dtype):
    return memory.meta_model(transformer_module().from_config, json.loads(config_json), dtype, cpu_buffers=True)


def streamed_bytes(model) -> int:
    """Device bytes of the streamed plan's weights: all but the blocks, and ``SLOTS`` blocks' buffers."""
    blocks = list(model.transformer_blocks)
    if not blocks:
        return memory.parameter_bytes(model)
    sizes = [_layout(block)[1] for block in blocks]
    return memory.parameter_bytes(model) - sum(memory.parameter_bytes(block) for block in blocks) + SLOTS * max(sizes)


def _tensors(block) -> list[tuple[object, str, bool]]:
    """(module, name, is_parameter) of every tensor a block holds, each tied tensor once."""
    found, seen = [], set()
    for module in block.modules():
        for group, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in group.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    found.append((module, name, is_parameter))
    return found


def _layout(block) -> tuple[list[tuple[object, str, bool, int]], int]:
    """Each tensor's place in the block's flat buffer (512-byte aligned), and the buffer's size in bytes."""
    places, offset = [], 0
    for module, name, is_parameter in _tensors(block):
        tensor = (module._parameters if is_parameter else module._buffers)[name]
        places.append((module, name, is_parameter, offset))
        offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    return places, offset


class BlockStreamer:
    """Streams ``transformer``'s blocks (loaded on the CPU, LoRAs already fused) to ``device`` as they run; the rest
    of the transformer moves to the device here. Keep a reference for as long as the transformer runs."""

    def __init__(self, transformer, device):
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        blocks = transformer.transformer_blocks
        # 1. Everything but the blocks to the device (torch's own .to, as the resident plan moves it)
        transformer.transformer_blocks = torch.nn.ModuleList()
        torch.nn.Module.to(transformer, device)
        transformer.transformer_blocks = blocks
        # 2. Each block's tensors into one flat pinned buffer; two device slots of the largest block's size
        layouts = [_layout(block) for block in blocks]
        self.host = _host_buffers([size for _, size in layouts], pin=self.cuda)
        largest = max((size for _, size in layouts), default=0)
        self.slots = [torch.empty(largest, dtype=torch.uint8, device=device) for _ in range(SLOTS)]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        if self.cuda:
            for buffer in self.slots:  # written on the side stream: not reused until its copies are done
                buffer.record_stream(self.stream)
        # per block and slot: the Parameters (and buffers) its modules hold while it runs from that slot
        self.views: list[list[list[tuple[object, str, bool, object]]]] = []
        with torch.no_grad():
            for index, (places, _) in enumerate(layouts):
                per_slot = [[] for _ in range(SLOTS)]
                for module, name, is_parameter, offset in places:
                    tensor = (module._parameters if is_parameter else module._buffers)[name]
                    nbytes = tensor.numel() * tensor.element_size()
                    host = self.host[index][offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
                    host.copy_(tensor)
                    for slot in range(SLOTS):
                        view = self.slots[slot][offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
                        if is_parameter:
                            view = torch.nn.Parameter(view, requires_grad=False)
                        per_slot[slot].append((module, name, is_parameter, view))
                    # the CPU copy is dropped: until the block first runs it points at its first slot
                    _put(module, name, is_parameter, per_slot[0][-1][3])
                self.views.append(per_slot)
        # 3. Copies on the side stream; an event per slot says its block arrived, another that its block finished
        self.arrived = [torch.cuda.Event() if self.cuda else None for _ in range(SLOTS)]
        self.finished = [torch.cuda.Event() if self.cuda else None for _ in range(SLOTS)]
        if self.cuda:
            for event in self.finished:
                event.record(torch.cuda.current_stream(device))
        self.prefetched: tuple[int, int] | None = None  # (block, slot) on its way
        self.running: dict[int, int] = {}  # block -> slot, while it runs
        self.count = len(blocks)
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(functools.partial(self._before, index))
            block.register_forward_hook(functools.partial(self._after, index))

    def _copy(self, index: int, slot: int) -> None:
        """Block ``index`` into ``slot``, once the block that last ran from it is done."""
        import torch

        host = self.host[index]
        if not self.cuda:
            self.slots[slot][: host.numel()].copy_(host)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.finished[slot])
            self.slots[slot][: host.numel()].copy_(host, non_blocking=True)
            self.arrived[slot].record(self.stream)

    def _before(self, index: int, module, args) -> None:
        import torch

        if self.prefetched is not None and self.prefetched[0] == index:
            slot = self.prefetched[1]
        else:  # the first block of the first call (or blocks run out of order): fetched now
            slot = 0 if self.prefetched is None else 1 - self.prefetched[1]
            self._copy(index, slot)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.arrived[slot])
        for holder, name, is_parameter, view in self.views[index][slot]:
            _put(holder, name, is_parameter, view)
        self.running[index] = slot
        following = (index + 1) % self.count
        self._copy(following, 1 - slot)
        self.prefetched = (following, 1 - slot)

    def _after(self, index: int, module, args, output):
        import torch

        slot = self.running.pop(index)
        if self.cuda:
            self.finished[slot].record(torch.cuda.current_stream(self.device))
        return output

    def close(self) -> None:
        """Wait for copies in flight, so the buffers can be freed."""
        if self.cuda:
            self.stream.synchronize()


def _host_buffers(sizes: list[int], pin: bool) -> list:
    """One uint8 buffer per block, in order, carved from (pinned) chunks of ``CHUNK`` bytes (a larger block: a chunk
    of its own, a power of two)."""
    import torch

    buffers, chunk, used = [], None, 0
    for size in sizes:
        if chunk is None or used + size > chunk.numel():
            chunk = torch.empty(max(CHUNK, 1 << max(size - 1, 0).bit_length()), dtype=torch.uint8, pin_memory=pin)
            used = 0
        buffers.append(chunk[used : used + size])
        used += size
    return buffers


def _put(module, name: str, is_parameter: bool, tensor) -> None:
    (module._parameters if is_parameter else module._buffers)[name] = tensor
