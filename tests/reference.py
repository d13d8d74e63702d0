"""Independent reference implementations the tests compare the project's code against.

Written from the formulas of docs/design.md §6 and §8 and docs/benchmarks.md (not from losses.py or
evaluate.py), in float64, so a shared mistake cannot make both sides agree; the peers' protocols in the
float32 their scripts compute in.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.metrics import structural_similarity
from skimage.transform import resize

MIN_DEPTH = 1e-3
MAX_DEPTH = 20.0


def template_ssim(x, y, dtype=torch.float64):
    """The course template's SSIM of (B, 1, H, W) tensors: one 11 × 11 Gaussian window as a 2-D
    convolution with zero padding 5, C1 = 0.01², C2 = 0.03², the map averaged over everything.

    float64 gives the formula's value; float32 the template's own arithmetic (10× faster here),
    which rounds E[x²] − μ² on metre values differently, by up to ~1e-4 in the mean.
    """
    x, y = x.to(dtype), y.to(dtype)
    r = torch.arange(11, dtype=dtype) - 5
    g = torch.exp(-(r**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = torch.outer(g, g).view(1, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, window, padding=5)

    mu1, mu2 = blur(x), blur(y)
    sigma1 = blur(x * x) - mu1**2
    sigma2 = blur(y * y) - mu2**2
    sigma12 = blur(x * y) - mu1 * mu2
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1**2 + mu2**2 + c1) * (sigma1 + sigma2 + c2))
    return float(m.mean())


def masked_ssim(x, y, mask, data_range, padding="valid", coverage=0.5):
    """SSIM of one HW image over its measured pixels (docs/design.md §6): every window statistic a
    mask-weighted Gaussian mean, the windows whose measured pixels carry at least `coverage` of the
    weight they have inside the image averaged; None when no window counts."""
    x, y, m = (np.asarray(a, np.float64) for a in (x, y, mask))
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    kernel = np.outer(g, g) / np.outer(g, g).sum()

    def blur(a):
        out = ndimage.correlate(a, kernel, mode="constant")
        return out if padding == "same" else out[5:-5, 5:-5]

    w = blur(m)
    safe = np.maximum(w, 1e-6)
    mu_x, mu_y = blur(m * x) / safe, blur(m * y) / safe
    var_x, var_y = blur(m * x * x) / safe - mu_x**2, blur(m * y * y) / safe - mu_y**2
    cov = blur(m * x * y) / safe - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    counted = w >= coverage * blur(np.ones_like(m))
    return float(s[counted].mean()) if counted.any() else None


def skimage_ssim(a, b, data_range):
    """scikit-image's SSIM with the settings docs/design.md §6 names for the standard metric."""
    return structural_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64), gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, data_range=data_range)


def standard_metrics(gt, pred_square):
    """The standard metrics of one image (docs/design.md §8), over its measured pixels (gt > 1 mm).

    gt: HW raw depth (clipped here to [0, 20]); pred_square: the network's S × S output, resized
    bilinearly (half-pixel centres, no antialiasing) to the gt's size, then clamped.
    """
    gt = np.clip(np.asarray(gt, np.float64), 0, MAX_DEPTH)
    pred = resize(np.asarray(pred_square, np.float64), gt.shape, order=1, mode="edge", anti_aliasing=False)
    pred = np.clip(pred, 0, MAX_DEPTH)
    valid = gt > MIN_DEPTH
    if valid.all():  # every pixel measured: the plain RMSE and SSIM
        out = {"rmse": np.sqrt(np.mean((gt - pred) ** 2)), "ssim": skimage_ssim(pred, gt, MAX_DEPTH)}
    else:  # holes (gt at or below MIN_DEPTH) count nowhere
        out = {"rmse": np.sqrt(np.mean((gt - pred)[valid] ** 2)), "ssim": masked_ssim(pred, gt, valid, MAX_DEPTH)}
    g, p = gt[valid], np.clip(pred[valid], MIN_DEPTH, MAX_DEPTH)
    out["abs_rel"] = np.mean(np.abs(g - p) / g)
    out["sq_rel"] = np.mean((g - p) ** 2 / g)
    out["rmse_log"] = np.sqrt(np.mean((np.log(g) - np.log(p)) ** 2))
    out["log10"] = np.mean(np.abs(np.log10(g) - np.log10(p)))
    log_error = np.log(p) - np.log(g)
    out["silog"] = 100 * np.sqrt(np.mean(log_error**2) - np.mean(log_error) ** 2)
    ratio = np.maximum(g / p, p / g)
    for i in (1, 2, 3):
        out[f"delta{i}"] = np.mean(ratio < 1.25**i)
    return out


# The peers' evaluation (BTS, AdaBins and ZoeDepth score NYU Depth v2 and KITTI this way), written here from the
# protocols' definitions in float32 as those scripts compute: the crop's box and the open depth interval make
# the mask, the prediction is optionally median-scaled over it (Monodepth2), then clipped into the interval
# (NaN to its minimum, inf to its maximum), and each metric is taken per image.
PEER_CAPS = {"nyu": (1e-3, 10.0), "kitti": (1e-3, 80.0), "kitti-eigen": (1e-3, 80.0)}


def peer_crop(protocol, height, width):
    """The 0/1 mask of the protocol's crop on a (height, width) ground truth."""
    mask = np.zeros((height, width), dtype=bool)
    if protocol == "nyu":
        mask[45:471, 41:601] = True
    elif protocol == "kitti":  # Garg et al.
        mask[int(0.40810811 * height):int(0.99189189 * height), int(0.03594771 * width):int(0.96405229 * width)] = 1
    else:  # Eigen et al. on KITTI
        mask[int(0.3324324 * height):int(0.91351351 * height), int(0.0359477 * width):int(0.96405229 * width)] = 1
    return mask


def peer_metrics(gt, pred, protocol, median_scale=False, caps=None):
    """The metrics of one image as the peers compute them: gt and pred HW arrays of one size; None when no pixel
    is scored."""
    low, high = caps or PEER_CAPS[protocol]
    gt, pred = np.asarray(gt, np.float32), np.array(pred, np.float32)
    valid = (gt > low) & (gt < high) & peer_crop(protocol, *gt.shape)
    if not valid.any():
        return None
    g, p = gt[valid], pred[valid]
    if median_scale:
        p = p * (np.median(g) / np.median(p))
    p[p < low] = low
    p[p > high] = high
    p[np.isinf(p)] = high
    p[np.isnan(p)] = low
    thresh = np.maximum(g / p, p / g)
    err = np.log(p) - np.log(g)
    return {"rmse": np.sqrt(((g - p) ** 2).mean()), "abs_rel": np.mean(np.abs(g - p) / g),
            "sq_rel": np.mean((g - p) ** 2 / g), "rmse_log": np.sqrt((err**2).mean()),
            "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
            "silog": np.sqrt(max(np.mean(err**2) - np.mean(err) ** 2, 0.0)) * 100,
            "delta1": (thresh < 1.25).mean(), "delta2": (thresh < 1.25**2).mean(), "delta3": (thresh < 1.25**3).mean()}
