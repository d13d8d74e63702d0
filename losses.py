"""RMSE, SSIM and the paper's loss L = α·RMSE + β·(1 − SSIM) (docs/design.md §6), plus optional edge and SILog terms.

Every term is computed from sums and counts (sum of squared errors and pixel count, sum of
per-image SSIMs and image count, ...), in the inputs' precision but never below fp32. The
loss adds those sums up across processes before dividing (distributed.sum_across_ranks),
so that N processes compute the loss of the whole global batch; on one process the same
code runs with nothing to add up.
"""
import functools

import torch
import torch.nn as nn

from conventions import PAPER

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5


def at_least_fp32(t):
    """`t` in fp32, or in its own dtype when that is wider (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gaussian_taps(size=WINDOW_SIZE, sigma=WINDOW_SIGMA, device=None, dtype=torch.float32):
    """Normalised 1-D Gaussian; its outer product is the 2-D SSIM window."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


@functools.lru_cache(maxsize=16)
def gaussian_band(n, padding, device, dtype=torch.float32):
    """(m, n) matrix M with M @ v the 11-tap Gaussian blur of a length-n signal v.

    "same": m = n, the window's part outside the signal falls away (zero padding);
    "valid": m = n − 10, only the positions where the whole window fits.
    """
    g = gaussian_taps(device=device, dtype=dtype)
    pad = WINDOW_SIZE // 2 if padding == "same" else 0
    m = n if padding == "same" else n - (WINDOW_SIZE - 1)
    offset = torch.arange(n, device=device)[None, :] - torch.arange(m, device=device)[:, None] + pad
    inside = (offset >= 0) & (offset < WINDOW_SIZE)
    return torch.where(inside, g[offset.clamp(0, WINDOW_SIZE - 1)], torch.zeros((), device=device, dtype=dtype))


def gaussian_blur_maps(maps, padding):
    """Blur each channel of (B, C, H, W) fp32 (or fp64) maps with the 11 × 11 Gaussian: rows @ maps @ colsᵀ.

    The 2-D window is the outer product of two 1-D ones, so the blur is a product with a
    banded matrix on each side: fewer, larger kernels than grouped convolutions, and the
    fastest of the variants bench.py --ssim-variants compares (docs/speed.md). The matrix
    products run in full fp32 unless TF32 matmuls are switched on
    (torch.backends.cuda.matmul.allow_tf32; off by default).
    """
    h, w = maps.shape[-2:]
    # Compiled, the bands are built once, into the graph: the cache is for eager steps, and Dynamo
    # warns (of a risk it has not seen) whenever it traces through one.
    band = gaussian_band.__wrapped__ if torch.compiler.is_compiling() else gaussian_band
    rows = band(h, padding, maps.device, maps.dtype)
    cols = band(w, padding, maps.device, maps.dtype)
    return rows @ maps @ cols.T


def ssim_map(x, y, data_range=1.0, padding="same"):
    """Per-pixel SSIM of (B, 1, H, W) maps; (B, 1, H', W') with H' = H for "same", H − 10 for "valid"."""
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"ssim expects two (B, 1, H, W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    # Variances are differences of squares of values up to 20 m: keep them in fp32
    # even when the network runs under bf16/fp16 autocast.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = at_least_fp32(x), at_least_fp32(y)
        stats = gaussian_blur_maps(torch.cat([x, y, x * x, y * y, x * y], dim=1), padding)
        return ssim_from_moments(*stats.split(1, dim=1), data_range)


def ssim_from_moments(mu_x, mu_y, e_xx, e_yy, e_xy, data_range):
    """SSIM from each window's local means of x, y, x², y² and xy (C1 = (0.01·range)², C2 = (0.03·range)²)."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return num / den


def loss_data_range(max_depth):
    """The data range of the loss's SSIM: the paper's constants C1 = 0.01², C2 = 0.03² on metres at its own
    range (data range 1), scaled with another range."""
    return max_depth / PAPER.max_depth


def count_like(t, n):
    """The count n as a 0-d tensor of t's dtype and device (torch.full: no host-to-device copy)."""
    return torch.full((), float(n), dtype=t.dtype, device=t.device)


def ssim_sums(x, y, data_range=1.0, padding="same", mask=None):
    """(Σ over images of each image's mean SSIM, number of images).

    mask (B, 1, H, W) bool, the measured pixels of y: each image's SSIM is then
    masked_ssim_per_image's, and an image without a window that counts counts for nothing.
    """
    if mask is None:
        per_image = ssim_map(x, y, data_range, padding).mean(dim=(1, 2, 3))
        return per_image.sum(), count_like(per_image, per_image.numel())
    per_image, scored = masked_ssim_per_image(x, y, mask, data_range, padding)
    return torch.where(scored, per_image, torch.zeros_like(per_image)).sum(), scored.to(per_image.dtype).sum()


def masked_ssim_per_image(x, y, mask, data_range=1.0, padding="same", coverage=0.5):
    """(SSIM of each image over its measured pixels (B,), whether the image has a window that counts (B,)).

    Every local statistic of ssim_map becomes a mask-weighted mean: the Gaussian window's
    weights on unmeasured pixels are dropped and the rest renormalised. A window counts when
    its measured pixels carry at least `coverage` of the weight it has inside the image; near
    the border of a "same" map the statistics are so over the pixels inside the image, where
    the unmasked SSIM zero-pads (the two agree on every window of a "valid" map without holes).
    Each image's SSIM is the mean over its windows that count. An unmeasured pixel enters
    every statistic with weight 0, so the gradient there is exactly zero.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = at_least_fp32(x), at_least_fp32(y)
        m = mask.to(x.dtype)
        stats = gaussian_blur_maps(torch.cat([m, m * x, m * y, m * x * x, m * y * y, m * x * y, torch.ones_like(m)],
                                             dim=1), padding)
        weight, s_x, s_y, s_xx, s_yy, s_xy, window = stats.split(1, dim=1)
        counts = weight >= coverage * window
        w = weight.clamp_min(1e-6)
        smap = ssim_from_moments(s_x / w, s_y / w, s_xx / w, s_yy / w, s_xy / w, data_range)
        windows = counts.to(x.dtype).sum(dim=(1, 2, 3))
        total = torch.where(counts, smap, torch.zeros_like(smap)).sum(dim=(1, 2, 3))
        return total / windows.clamp_min(1), windows > 0


def ssim(x, y, data_range=1.0, padding="same"):
    """Mean over images of each image's mean SSIM.

    padding="same", data_range=1: the course template's SSIM used in the paper's loss
    (zero padding of 5, C1 = 0.01², C2 = 0.03² on metre-valued depth).
    padding="valid", data_range=20: the standard metric, equal to scikit-image's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False).
    """
    total, count = ssim_sums(x, y, data_range, padding)
    return total / count


def squared_error_sums(pred, target, mask=None):
    """(Σ (pred − target)² over every pixel, or over the pixels of `mask`, and their number)."""
    err = at_least_fp32(pred) - at_least_fp32(target)
    if mask is None:
        return (err * err).sum(), count_like(err, err.numel())
    return torch.where(mask, err * err, torch.zeros_like(err)).sum(), mask.to(err.dtype).sum()


def rmse(pred, target):
    """sqrt(mean((pred − target)²)) over every pixel of the batch."""
    total, count = squared_error_sums(pred, target)
    return torch.sqrt(total / count)


def gradient_error_sums(pred, target, mask=None):
    """(Σ|Δx error|, count, Σ|Δy error|, count): the edge loss's sums; with `mask`, only over differences
    between two measured pixels."""
    pred, target = at_least_fp32(pred), at_least_fp32(target)
    dx = (pred.diff(dim=-1) - target.diff(dim=-1)).abs()
    dy = (pred.diff(dim=-2) - target.diff(dim=-2)).abs()
    if mask is None:
        return dx.sum(), count_like(dx, dx.numel()), dy.sum(), count_like(dy, dy.numel())
    mx, my = mask[..., 1:] & mask[..., :-1], mask[..., 1:, :] & mask[..., :-1, :]
    zero = torch.zeros_like(dx[:1, :1, :1, :1])
    return (torch.where(mx, dx, zero).sum(), mx.to(dx.dtype).sum(),
            torch.where(my, dy, zero).sum(), my.to(dy.dtype).sum())


def gradient_loss(pred, target):
    """Edge loss: mean L1 difference of the horizontal and vertical finite differences.

    Penalises blurred or misplaced depth edges, which RMSE and the 11 × 11 SSIM window
    barely see; zero for identical maps and for maps that differ by a constant.
    """
    sum_x, n_x, sum_y, n_y = gradient_error_sums(pred, target)
    return sum_x / n_x + sum_y / n_y


def silog_per_image(pred, target, lam=0.85, min_depth=PAPER.min_depth):
    """Scale-invariant log loss (Eigen et al. 2014) of each image, (B,).

    With d = log(pred) − log(gt) over pixels with gt > min_depth (pred clamped to at least
    min_depth, since the network's raw output can be ≤ 0): sqrt(mean(d²) − lam·mean(d)²).
    lam = 1 is fully invariant to a global scale of pred; lam < 1 keeps some weight on the
    absolute scale. Unscaled (BTS multiplies by 10): set its weight with silog_weight.
    """
    pred, target = at_least_fp32(pred), at_least_fp32(target)
    valid = (target > min_depth).to(pred.dtype)
    n = valid.sum(dim=(1, 2, 3)).clamp_min(1)
    d = (pred.clamp_min(min_depth).log() - target.clamp_min(min_depth).log()) * valid
    mean_d = d.sum(dim=(1, 2, 3)) / n
    mean_d2 = (d * d).sum(dim=(1, 2, 3)) / n
    # Clamped away from 0: sqrt's gradient at 0 is infinite (it occurs for a perfect prediction).
    return (mean_d2 - lam * mean_d * mean_d).clamp_min(1e-12).sqrt()


def silog_sums(pred, target, lam=0.85, min_depth=PAPER.min_depth):
    """(Σ over images of silog_per_image, number of images)."""
    per_image = silog_per_image(pred, target, lam, min_depth)
    return per_image.sum(), count_like(per_image, per_image.numel())


def silog_loss(pred, target, lam=0.85, min_depth=PAPER.min_depth):
    """silog_per_image averaged over the batch."""
    total, count = silog_sums(pred, target, lam, min_depth)
    return total / count


def no_reduction(t):
    return t


class DepthLoss(nn.Module):
    """L = α·RMSE + β·(1 − SSIM) [+ grad_weight·edge loss + silog_weight·SILog]; returns (total, parts for logging).

    The extra terms are computed, and appear in the parts, only when their weight is not 0:
    with the defaults this is exactly the paper's loss. Each term comes from sums and counts,
    which `reduce` adds up over the processes of a distributed run (distributed.sum_across_ranks;
    by default nothing is added: one process): every term is then that of the global batch, as
    one process would compute it. RMSE is a square root of a mean, so averaging per-process
    losses would not give that.
    """

    def __init__(self, alpha=1.0, beta=1.0, grad_weight=0.0, silog_weight=0.0, reduce=None, min_depth=None,
                 max_depth=PAPER.max_depth):
        super().__init__()
        # min_depth: the target's pixels at or below it are not measured and count nowhere (a data set
        # with holes); None: every pixel counts, as in the paper.
        self.min_depth = min_depth
        self.data_range = loss_data_range(max_depth)
        self.alpha = alpha
        self.beta = beta
        self.grad_weight = grad_weight
        self.silog_weight = silog_weight
        self.reduce = reduce or no_reduction

    def forward(self, pred, target):
        mask = None if self.min_depth is None else target > self.min_depth
        sums = [*squared_error_sums(pred, target, mask),
                *ssim_sums(pred, target, data_range=self.data_range, padding="same", mask=mask)]
        if self.grad_weight:
            sums += gradient_error_sums(pred, target, mask)
        if self.silog_weight:
            sums += silog_sums(pred, target, min_depth=PAPER.min_depth if self.min_depth is None else self.min_depth)
        s = self.reduce(torch.stack(sums))
        err, sim = torch.sqrt(s[0] / s[1]), s[2] / s[3]
        total = self.alpha * err + self.beta * (1 - sim)
        parts = {"rmse": err.detach(), "ssim": sim.detach()}
        if self.grad_weight:
            grad = s[4] / s[5] + s[6] / s[7]
            total = total + self.grad_weight * grad
            parts["grad"] = grad.detach()
        if self.silog_weight:
            silog = s[-2] / s[-1]
            total = total + self.silog_weight * silog
            parts["silog"] = silog.detach()
        return total, {"loss": total.detach(), **parts}
