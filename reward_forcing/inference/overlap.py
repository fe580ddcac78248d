"""Decode overlapped with generation: the decoder works on chunk k while the DiT denoises chunk k+1.

One worker thread runs every decode of a video in order (a streaming decoder carries state from chunk to chunk),
with at most one chunk in flight, so the results are the sequential ones, in order. On CUDA the worker
issues its kernels on a side stream that first waits for the chunk's producer (an event recorded on the main
stream), so the GPU can run both; on CPU the thread alone gives the overlap. Same code on both devices.
"""
import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


class _DeviceLane:
    """Where the worker's kernels go: a CUDA side stream ordered after the producer, or nothing on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def ready_marker(self, tensor: torch.Tensor):
        """Called on the producer's thread right after `tensor` was made: a CUDA event on its stream."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        tensor.record_stream(self.stream)  # the allocator must not reuse it while the side stream reads it
        return event

    def context(self, marker):
        """Entered on the worker thread before consuming the tensor."""
        if not self.cuda:
            return contextlib.nullcontext()
        self.stream.wait_event(marker)
        return torch.cuda.stream(self.stream)


def overlapped(chunks: Iterable[torch.Tensor], decode: Callable[[torch.Tensor], object],
               device: torch.device) -> Iterator[object]:
    """decode(chunk) for every chunk of `chunks`, in order, each decode running while the next chunk is made.
    decode must return host data (e.g. uint8 frames), so its result is complete when the worker returns it."""
    lane = _DeviceLane(torch.device(device))
    threads = torch.get_num_threads()

    def work(chunk, marker):
        torch.set_num_threads(threads)  # same intra-op threads as sequential decoding: same reductions, same bits
        with torch.no_grad(), lane.context(marker):
            return decode(chunk)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = None
        for chunk in chunks:
            future = pool.submit(work, chunk, lane.ready_marker(chunk))
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()
