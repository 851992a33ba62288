"""Local response normalisation (§3.3), kept inside each tower, with its hand-derived gradient.

With ``n = size`` and the window ``W(c) = c - n//2 ... c + (n-1)//2`` (``nn.LocalResponseNorm``'s;
channels past a tower's edge count as zero):

    d_c = k + (alpha / n) * sum_{j in W(c)} a_j^2,      b_c = a_c * d_c^-beta
    dL/da_c = g_c d_c^-beta - (2 alpha beta / n) a_c sum_{j: c in W(j)} g_j a_j d_j^(-beta-1)

The 2012 code computed it per tower (one GPU each), so the window never crosses a tower boundary;
``groups=1`` lets it cross (Caffe). Two implementations of the same formula, picked by the input:

* on the CPU, in float32 or float64, for the window of 5 and beta = 3/4 that the paper, the 2012 code
  and Caffe all use: loops compiled by Numba, one pass over the input forward and one over input and
  gradient backward, recomputing ``d`` rather than storing it, in NCHW or channels_last. On the CPU
  the LRN is bound by memory traffic, and the tensor-operation version below makes about fifteen
  passes over the activation per layer (BENCHMARKS.md).
* otherwise (CUDA, bfloat16, other constants): tensor operations, the window sum as one matmul with
  a band matrix. Also under ``torch.compile`` on any device: the compiler traces tensor operations,
  not Numba's loops.

Both are tested against the written-out formula, against each other and with gradcheck.
"""

import numba
import numpy as np
import torch
from torch import nn

# b = a / (k + (alpha / size) * sum of a^2 over `size` adjacent channels) ** beta: the paper's §3.3
# constants as the 2012 code's "cmrnorm" layer applies them (it divides alpha by size).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def local_response_norm(
    x: torch.Tensor,
    groups: int,
    size: int = LRN_SIZE,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
    k: float = LRN_K,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Cross-channel LRN of ``x`` (batch, channels, height, width) whose window stays in its group.

    ``compiled``: None picks the compiled loops where they apply (a float32/float64 CPU tensor, size 5,
    beta 3/4, not inside ``torch.compile``) and tensor operations otherwise; True or False forces one.
    Both give the same values to float rounding.
    """
    if x.dim() != 4 or x.shape[1] % groups:
        raise ValueError(
            f"local_response_norm needs (batch, channels, height, width) with channels divisible by "
            f"groups={groups}; got shape {tuple(x.shape)}"
        )
    can_compile = (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and size == COMPILED_SIZE
        and beta == COMPILED_BETA
        and not torch.compiler.is_compiling()  # torch.compile traces tensor operations, not Numba's loops
    )
    if compiled and not can_compile:
        raise ValueError(
            f"compiled=True needs a float32 or float64 CPU tensor, size={COMPILED_SIZE} and "
            f"beta={COMPILED_BETA}, outside torch.compile; got {x.dtype} on {x.device}, size={size}, beta={beta}"
        )
    use = _CompiledLRN if (can_compile if compiled is None else compiled) else _TensorOpsLRN
    return use.apply(x, groups, size, alpha, beta, k)


class LocalResponseNorm(nn.Module):
    """``local_response_norm`` as a layer; ``groups=1`` lets the window cross towers (Caffe)."""

    def __init__(
        self, groups: int, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K
    ):
        super().__init__()
        self.groups, self.size, self.alpha, self.beta, self.k = groups, size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.groups, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def _standard_layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` in one of the two layouts both implementations take, NCHW or channels_last (a copy only
    if it is in neither), and whether it is channels_last."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# --- CPU: compiled loops --------------------------------------------------------------------------
#
# For the window of 5 and beta = 3/4, the constants of the paper, the 2012 code and Caffe alike (k and
# alpha are free): the window sum is spelled out (_window), so that each channel's d, d^-3/4 and result
# come out of one loop the compiler vectorises; a loop over the window, or a branch on beta, stops it
# from doing so and costs twice the time (BENCHMARKS.md). A channels_last tensor is handled as
# (pixels, channels) rows, any other as (batch, channels, pixels) planes, so that the vectorised loop
# runs along contiguous memory. Scratch arrays hold one tower's values with two zeros past each edge.
# No fastmath: the arithmetic is IEEE, as torch's.

COMPILED_SIZE, COMPILED_BETA = 5, 0.75  # what the loops below are written for (the paper's LRN_SIZE, LRN_BETA)
_ROWS_PER_TASK = 64  # channels_last: pixels per parallel task
_PIXELS_PER_TASK = 256  # NCHW: pixels of one image and one tower per parallel task


@numba.njit(inline="always")
def _window(v, c):
    """v[c] + ... + v[c + 4]: channel c's window, in one tower's values with two zeros past each edge."""
    return v[c] + v[c + 1] + v[c + 2] + v[c + 3] + v[c + 4]


@numba.njit(inline="always")
def _window_at(v, c, i):
    """The same at pixel i, for values held as (channels + 4, pixels) planes."""
    return v[c, i] + v[c + 1, i] + v[c + 2, i] + v[c + 3, i] + v[c + 4, i]


@numba.njit(inline="always")
def _inverse_powers(d):
    """(d^-3/4, 1/d) from one division and two square roots (a general pow costs several times more)."""
    r = np.reciprocal(d)
    s = np.sqrt(r)
    return s * np.sqrt(s), r


@numba.njit(parallel=True, cache=True)
def _forward_rows(a, out, groups, scale, k):
    """Channels_last: ``a`` and ``out`` are (pixels, channels)."""
    pixels, channels = a.shape
    n = channels // groups
    for task in numba.prange((pixels + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        sq = np.zeros(n + 4, a.dtype)  # one tower's a^2 at [2, 2 + n)
        for p in range(task * _ROWS_PER_TASK, min(pixels, (task + 1) * _ROWS_PER_TASK)):
            for t in range(groups):
                x, y = a[p, t * n : (t + 1) * n], out[p, t * n : (t + 1) * n]
                for c in range(n):
                    sq[2 + c] = x[c] * x[c]
                for c in range(n):
                    y[c] = x[c] * _inverse_powers(k + scale * _window(sq, c))[0]


@numba.njit(parallel=True, cache=True)
def _backward_rows(a, g, grad, groups, scale, k, coef):
    """Channels_last: ``a``, ``g`` (the output's gradient) and ``grad`` are (pixels, channels)."""
    pixels, channels = a.shape
    n = channels // groups
    for task in numba.prange((pixels + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        sq = np.zeros(n + 4, a.dtype)  # a^2 at [2, 2 + n)
        spread = np.zeros(n + 4, a.dtype)  # g a d^(-beta-1) at [2, 2 + n); the window is symmetric
        power = np.empty(n, a.dtype)  # d^-beta
        for p in range(task * _ROWS_PER_TASK, min(pixels, (task + 1) * _ROWS_PER_TASK)):
            for t in range(groups):
                x, dy, dx = a[p, t * n : (t + 1) * n], g[p, t * n : (t + 1) * n], grad[p, t * n : (t + 1) * n]
                for c in range(n):
                    sq[2 + c] = x[c] * x[c]
                for c in range(n):
                    power[c], r = _inverse_powers(k + scale * _window(sq, c))
                    spread[2 + c] = dy[c] * x[c] * power[c] * r
                for c in range(n):
                    dx[c] = dy[c] * power[c] - coef * x[c] * _window(spread, c)


@numba.njit(inline="always")
def _plane_task(a, task, groups):
    """Task ``task`` of the NCHW kernels: (image, its tower's first channel, first and last pixel + 1,
    and the tower's a^2 in rows [2, 2 + n) of a (n + 4, pixels) array, zero elsewhere)."""
    batch, channels, pixels = a.shape
    n = channels // groups
    chunks = (pixels + _PIXELS_PER_TASK - 1) // _PIXELS_PER_TASK
    image, first, chunk = task // (groups * chunks), task // chunks % groups * n, task % chunks
    start, stop = chunk * _PIXELS_PER_TASK, min(pixels, (chunk + 1) * _PIXELS_PER_TASK)
    sq = np.zeros((n + 4, stop - start), a.dtype)
    for c in range(n):
        x = a[image, first + c, start:stop]
        for i in range(stop - start):
            sq[2 + c, i] = x[i] * x[i]
    return image, first, start, stop, sq


@numba.njit(inline="always")
def _plane_tasks(a, groups):
    """How many tasks the NCHW kernels split ``a`` into: one per image, tower and block of pixels."""
    batch, channels, pixels = a.shape
    return batch * groups * ((pixels + _PIXELS_PER_TASK - 1) // _PIXELS_PER_TASK)


@numba.njit(parallel=True, cache=True)
def _forward_planes(a, out, groups, scale, k):
    """NCHW: ``a`` and ``out`` are (batch, channels, pixels). Whole rows ``a[i, c, start:stop]`` are
    indexed, not 2-d blocks, so that the compiler knows their stride is 1."""
    n = a.shape[1] // groups
    for task in numba.prange(_plane_tasks(a, groups)):
        image, first, start, stop, sq = _plane_task(a, task, groups)
        for c in range(n):
            x, y = a[image, first + c, start:stop], out[image, first + c, start:stop]
            for i in range(stop - start):
                y[i] = x[i] * _inverse_powers(k + scale * _window_at(sq, c, i))[0]


@numba.njit(parallel=True, cache=True)
def _backward_planes(a, g, grad, groups, scale, k, coef):
    """NCHW: ``a``, ``g`` (the output's gradient) and ``grad`` are (batch, channels, pixels)."""
    n = a.shape[1] // groups
    for task in numba.prange(_plane_tasks(a, groups)):
        image, first, start, stop, sq = _plane_task(a, task, groups)
        spread = np.zeros((n + 4, stop - start), a.dtype)  # g a d^(-beta-1) in rows [2, 2 + n)
        power = np.empty((n, stop - start), a.dtype)  # d^-beta
        for c in range(n):
            x, dy = a[image, first + c, start:stop], g[image, first + c, start:stop]
            for i in range(stop - start):
                power[c, i], r = _inverse_powers(k + scale * _window_at(sq, c, i))
                spread[2 + c, i] = dy[i] * x[i] * power[c, i] * r
        for c in range(n):
            x, dy, dx = (
                a[image, first + c, start:stop],
                g[image, first + c, start:stop],
                grad[image, first + c, start:stop],
            )
            for i in range(stop - start):
                dx[i] = dy[i] * power[c, i] - coef * x[i] * _window_at(spread, c, i)


def _kernel_arrays(channels_last: bool, *tensors: torch.Tensor):
    """NumPy views of (batch, channels, h, w) tensors in one layout: (pixels, channels) rows if
    channels_last, else (batch, channels, pixels) planes."""
    b, c, h, w = tensors[0].shape
    if channels_last:
        return [t.detach().permute(0, 2, 3, 1).view(b * h * w, c).numpy() for t in tensors]
    return [t.detach().view(b, c, h * w).numpy() for t in tensors]


def _constants(x: torch.Tensor, alpha: float, k: float):
    """alpha / size, k and the backward's 2 beta alpha / size, in x's precision, so that the kernels'
    arithmetic stays in it."""
    as_dtype = np.float32 if x.dtype == torch.float32 else np.float64
    scale = alpha / COMPILED_SIZE
    return as_dtype(scale), as_dtype(k), as_dtype(2 * COMPILED_BETA * scale)


def _use_torch_threads() -> None:
    """Numba's threads as many as torch's (Lightning sets fewer per process under DDP on the CPU)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class _CompiledLRN(torch.autograd.Function):
    """The formula in compiled loops (CPU, float32/float64, size 5, beta 3/4). Saves only the input,
    which the ReLU before it keeps alive anyway; the backward recomputes d rather than store it."""

    @staticmethod
    def forward(ctx, x, groups, size, alpha, beta, k):
        x, channels_last = _standard_layout(x)
        out = torch.empty_like(x)  # same memory format; a fresh tensor, as code2012's in-place ReLU follows it
        a, y = _kernel_arrays(channels_last, x, out)
        scale, k_, _ = _constants(x, alpha, k)
        _use_torch_threads()
        (_forward_rows if channels_last else _forward_planes)(a, y, groups, scale, k_)
        ctx.save_for_backward(x)
        ctx.lrn = groups, alpha, k, channels_last
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        groups, alpha, k, channels_last = ctx.lrn
        grad_out = grad_out.contiguous(memory_format=_memory_format(channels_last))
        grad = torch.empty_like(x)
        a, g, dx = _kernel_arrays(channels_last, x, grad_out, grad)
        _use_torch_threads()
        (_backward_rows if channels_last else _backward_planes)(a, g, dx, groups, *_constants(x, alpha, k))
        return grad, None, None, None, None, None


# --- anywhere: tensor operations ------------------------------------------------------------------


def _window_matrix(channels: int, size: int, scale: float, like: torch.Tensor) -> torch.Tensor:
    """(channels, channels) band matrix: ``scale`` where j - c is in the window [-(size // 2),
    (size - 1) // 2], else 0; ``matrix @ a`` sums ``a`` over every channel's window."""
    c = torch.arange(channels, device=like.device)
    offset = c[None, :] - c[:, None]
    return ((offset >= -(size // 2)) & (offset <= (size - 1) // 2)).to(like.dtype) * scale


def _over_channels(matrix: torch.Tensor, a: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``matrix`` applied along the channel dim of ``a`` (one batched matmul, no loop):
    ``a`` is (batch * groups, channels, h * w), or (batch * h * w, groups, channels) if channels last."""
    if channels_last:  # one (batch * h * w * groups, channels) @ (channels, channels) product, not a bmm of tiny ones
        return torch.mm(a.reshape(-1, a.shape[-1]), matrix.T).view(a.shape)
    return matrix @ a


def _tower_view(x: torch.Tensor, groups: int, channels_last: bool) -> torch.Tensor:
    """A view of (b, c, h, w) in a standard layout with each tower's channels along one dim (see _over_channels)."""
    b, c, h, w = x.shape
    if channels_last:
        return x.permute(0, 2, 3, 1).view(b * h * w, groups, c // groups)
    return x.view(b * groups, c // groups, h * w)


def _inverse_power(d: torch.Tensor, beta: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """d ** -beta. For the paper's beta = 3/4 it is d^(1/4) / d from two square roots and a division:
    three cheap passes where a general ``pow`` costs several times more on the CPU (BENCHMARKS.md)."""
    if beta == 0.75:
        return torch.sqrt(d, out=out).sqrt_().div_(d)
    return torch.pow(d, -beta, out=out)


class _TensorOpsLRN(torch.autograd.Function):
    """The formula in tensor operations (any device and dtype). The window sums are one matmul with a
    band matrix (its transpose in the backward): fewer passes than shifted adds, no padded copies. It
    saves the input and d, and writes into tensors it already holds where it can."""

    @staticmethod
    def forward(ctx, x, groups, size, alpha, beta, k):
        x, channels_last = _standard_layout(x)
        with torch.autocast(x.device.type, enabled=False):  # in x's dtype, as the layers around it
            a = _tower_view(x, groups, channels_last)
            window = _window_matrix(a.shape[-2] if not channels_last else a.shape[-1], size, alpha / size, a)
            # a fresh tensor, not a view of a reshaped result: code2012's in-place ReLU follows it
            out = torch.empty_like(x)
            b = _tower_view(out, groups, channels_last)
            d = _over_channels(window, torch.mul(a, a, out=b), channels_last).add_(k)  # a^2 held in out's memory
            _inverse_power(d, beta, out=b).mul_(a)
        ctx.save_for_backward(x, d, window)
        ctx.lrn = groups, beta, channels_last
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, d, window = ctx.saved_tensors
        groups, beta, channels_last = ctx.lrn
        with torch.autocast(x.device.type, enabled=False):
            a = _tower_view(x, groups, channels_last)
            g = _tower_view(grad_out.contiguous(memory_format=_memory_format(channels_last)), groups, channels_last)
            grad = _inverse_power(d, beta).mul_(g)  # g d^-beta
            spread = torch.mul(grad, a).div_(d)  # g a d^(-beta-1)
            spread = _over_channels(window.T, spread, channels_last)  # the transposed window, times alpha/n
            grad.addcmul_(a, spread, value=-2 * beta)
        b, c, h, w = x.shape
        if channels_last:
            return grad.view(b, h, w, c).permute(0, 3, 1, 2), None, None, None, None, None
        return grad.view(b, c, h, w), None, None, None, None, None
