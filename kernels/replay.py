"""Launching a step's kernels again through their compiled kernels, without Triton's JIT binder.

``fn[grid](*args)`` binds the arguments, specialises every one of them (pointer alignment,
integers equal to 1 or divisible by 16), hashes a cache key, checks the globals the kernel read
and only then calls the generated launcher: 14-25 us a launch on a 2-core Xeon, 4-6 launches a
step. A step's launches are the same every step as long as its tables are: the first step
launches through the JIT and records, for each launch, the :class:`~triton.compiler.CompiledKernel`
it got and the arguments it bound; later steps call the launcher with them (~2-4 us a launch),
as ``CompiledKernel.__getitem__`` does (Triton's own "launch a compiled kernel" path).

Arguments that may change between steps without changing the kernel (the group table, the
option table, a GradScaler's scale and found-inf tensors: pointers whose only specialisation is
16-byte alignment) are "dynamic": a replay puts their current addresses in, provided they are
16-byte aligned as the recorded ones were; anything else records anew through the JIT.

Used only where the launcher convention is the one of Triton 3.6 (the GPU machines' version,
also Triton 3.9's): ``run(grid0, grid1, grid2, stream, function, packed_metadata,
launch_metadata, enter_hook, exit_hook, *every_bound_argument)``. ``FASTSCHED_TRITON_REPLAY=0``
turns it off; a launch hook (``triton.knobs.runtime.launch_enter_hook``, e.g. Proton) sends the
step through the JIT so that the hook sees every launch.
"""

from __future__ import annotations

import os

import torch
import triton

__all__ = ["ENABLED", "Launch", "Recording", "record", "hooks_set", "current_device"]


def _supported() -> bool:
    if os.environ.get("FASTSCHED_TRITON_REPLAY", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    # the launcher convention checked: 3.6 (stand-in driver, bench/launch_check.py) and 3.9
    # (its source); a later Triton launches through the JIT until checked
    return (3, 6) <= (major, minor) <= (3, 9)


#: whether steps replay their launches (see the module docstring)
ENABLED = _supported()

try:  # triton >= 3.4
    from triton import knobs as _knobs

    def _active(hook) -> bool:
        # Triton 3.6 keeps a HookChain there at all times, empty unless a hook was added
        return hook is not None and (not hasattr(hook, "calls") or bool(hook.calls))

    def hooks_set() -> bool:
        """A launch hook is installed: launches must go through the JIT."""
        rt = _knobs.runtime
        return _active(rt.launch_enter_hook) or _active(rt.launch_exit_hook)
except ImportError:  # pragma: no cover - older Triton: ENABLED is False there
    def hooks_set() -> bool:
        return True


def _address(v) -> int:
    return v.data_ptr()


class Launch:
    """One recorded launch: the compiled kernel's launcher and every bound argument (tensors
    as their addresses), plus where the dynamic tensors go."""

    __slots__ = ("run", "function", "packed", "grid", "args", "slots", "keep")

    def __init__(self, fn, kernel, grid: tuple, args: tuple, kwargs: dict, dynamic: tuple):
        vals = list(args)
        for p in fn.params[len(args):]:
            vals.append(kwargs[p.name] if p.name in kwargs else p.default)
        # dynamic tensors, by identity: (argument position, index into `dynamic`)
        self.slots = tuple((i, j) for i, v in enumerate(vals) for j, d in enumerate(dynamic)
                           if d is not None and v is d)
        # the tensors behind the addresses, and the compiled kernel whose module the function
        # handle lives in (Triton unloads it when the CompiledKernel is collected)
        self.keep = [kernel] + [v for v in vals if isinstance(v, torch.Tensor)]
        self.args = [_address(v) if isinstance(v, torch.Tensor) else v for v in vals]
        self.run = kernel.run
        self.function = kernel.function
        self.packed = kernel.packed_metadata
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


class Recording:
    """The launches of one step, replayable while ``key`` (the plan's static inputs) holds."""

    __slots__ = ("key", "launches", "dynamic", "device")

    def __init__(self, key: tuple, launches: list[Launch], dynamic: tuple, device: int):
        self.key = key
        self.launches = launches
        self.dynamic = dynamic
        self.device = device

    def matches(self, key: tuple) -> bool:
        """``key`` is the recorded one: the first element equal, the others the same objects."""
        k = self.key
        return len(k) == len(key) and k[0] == key[0] and all(
            a is b for a, b in zip(k[1:], key[1:]))

    def replay(self, dynamic: tuple) -> bool:
        """Launch every recorded kernel with the current dynamic tensors; False (nothing
        launched) when one of them is not 16-byte aligned where the recorded one was, a launch
        hook is set or the current device changed."""
        if hooks_set():
            return False
        drv = triton.runtime.driver.active
        device = drv.get_current_device()
        if device != self.device:
            return False
        fresh = [None] * len(dynamic)
        for j, (now, then) in enumerate(zip(dynamic, self.dynamic)):
            if now is not then:
                if now is None or then is None:
                    return False
                # the kernel was specialised on the pointer's element type and alignment, and
                # the JIT would refuse a tensor on another device
                if now.dtype != then.dtype or now.device != then.device:
                    return False
                a = now.data_ptr()
                if a & 15 or then.data_ptr() & 15:
                    return False
                fresh[j] = a
        stream = drv.get_current_stream(device)
        for ln in self.launches:
            args = ln.args
            if ln.slots and any(fresh[j] is not None for _, j in ln.slots):
                args = list(args)
                for i, j in ln.slots:
                    if fresh[j] is not None:
                        args[i] = fresh[j]
            g0, g1, g2 = ln.grid
            ln.run(g0, g1, g2, stream, ln.function, ln.packed, None, None, None, *args)
        return True


def current_device() -> int:
    """The device Triton launches on now (the JIT's ``get_current_device()``)."""
    return triton.runtime.driver.active.get_current_device()


def record(sink: list | None, fn, kernel, grid: tuple, args: tuple, kwargs: dict,
           dynamic: tuple) -> None:
    """Append the launch ``fn[grid](*args, **kwargs)`` that returned ``kernel`` to ``sink``
    (nothing when ``sink`` is None or the launch did not return a compiled kernel, as under
    the interpreter or a recording wrapper)."""
    if sink is None:
        return
    if kernel is None or not hasattr(kernel, "packed_metadata") or not hasattr(fn, "params"):
        sink.append(None)  # a launch that cannot be replayed: the step is not recorded
        return
    sink.append(Launch(fn, kernel, grid, args, kwargs, dynamic))
