"""Per-sample train augmentation after the crop and flip: ``data.auto_augment`` (timm's RandAugment strings,
torchvision's TrivialAugmentWide, AutoAugment's ImageNet policy), ``data.color_jitter`` and ``data.random_erasing``.

Every random choice is drawn here, from transforms.sample_uniforms (seed, epoch, sample position) at stream indices
after the crops' (see ``ERASE_FIRST`` ...), into a plan that does not depend on the pixels: per op slot an op id and
its parameter in the op's own unit, per sample the jitter factors and order and the erasing box. Both backends apply
the same plan, so a resumed epoch is bit-exact and the backends agree sample by sample: the torchvision backend per
sample in its workers (``apply_ops``: torchvision.transforms.v2 ops on uint8 CHW tensors, the reference), the DALI
backend on its whole uint8 batch (``TrainAugment.apply_batch``, on the GPU when DALI decoded there): one pass per op
type and slot with per-sample parameters, equal to the reference up to float rounding. Rotate / shear / translate
with bicubic interpolation use our ``affine_images`` (torchvision's tensor ops have no bicubic mode) in both.
Random erasing works on the normalized batch on the device (``erase_batch``), the same code for every backend, as
timm's PrefetchLoader does it.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from .transforms import NUM_DRAWS, host_to_device, sample_uniforms, train_img_size

__all__ = [
    "OPS",
    "Policy",
    "parse_policy",
    "AugmentPlan",
    "augment_plan",
    "apply_ops",
    "affine_theta",
    "affine_thetas",
    "erase_noise",
    "affine_images",
    "apply_jitter",
    "erase_boxes",
    "erase_batch",
    "needs_plan",
    "TrainAugment",
]

# The ops both backends implement; a plan names them by position. Parameters: rotate degrees (counter-clockwise);
# posterize bits kept; solarize threshold (pixels >= it are inverted); solarize_add the amount added to pixels <
# 128; enhance ops (color = saturation, contrast, brightness, sharpness) the blend factor (1 = unchanged); shear_x /
# shear_y the shear factor (torchvision's: angle atan(factor) about the top-left corner); translate_x / translate_y
# pixels.
OPS = (
    "identity",
    "auto_contrast",
    "equalize",
    "invert",
    "rotate",
    "posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
OP_ID = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

_DENOM = 10.0  # timm: magnitude M maps to the op's argument through level = M / 10


# timm's op names -> (our op, level -> parameter, randomly negated); the mappings of timm/data/auto_augment.py
# (its *_level_to_arg functions). Translate levels are fractions of the image side, scaled in augment_plan.
_TIMM_OPS = {
    "AutoContrast": ("auto_contrast", lambda m: 0.0, False),
    "Equalize": ("equalize", lambda m: 0.0, False),
    "Invert": ("invert", lambda m: 0.0, False),
    "Rotate": ("rotate", lambda m: m / _DENOM * 30.0, True),
    "Posterize": ("posterize", lambda m: int(m / _DENOM * 4), False),
    "PosterizeIncreasing": ("posterize", lambda m: 4 - int(m / _DENOM * 4), False),
    "PosterizeOriginal": ("posterize", lambda m: int(m / _DENOM * 4) + 4, False),
    "Solarize": ("solarize", lambda m: min(256, int(m / _DENOM * 256)), False),
    "SolarizeIncreasing": ("solarize", lambda m: 256 - min(256, int(m / _DENOM * 256)), False),
    "SolarizeAdd": ("solarize_add", lambda m: min(128, int(m / _DENOM * 110)), False),
    "ShearX": ("shear_x", lambda m: m / _DENOM * 0.3, True),
    "ShearY": ("shear_y", lambda m: m / _DENOM * 0.3, True),
    "TranslateXRel": ("translate_x", lambda m: m / _DENOM * 0.45, True),
    "TranslateYRel": ("translate_y", lambda m: m / _DENOM * 0.45, True),
}
for _name in ("Color", "Contrast", "Brightness", "Sharpness"):
    _TIMM_OPS[_name] = (_name.lower(), lambda m: m / _DENOM * 1.8 + 0.1, False)
    # timm keeps the increasing factor >= 0.1 after the sign: max(0.1, 1 +- m / 10 * 0.9), see _timm_param
    _TIMM_OPS[_name + "Increasing"] = (_name.lower(), lambda m: m / _DENOM * 0.9, True)
_INCREASING_ENHANCE = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}

_RAND_OPS = (
    "AutoContrast Equalize Invert Rotate Posterize Solarize SolarizeAdd Color Contrast Brightness Sharpness "
    "ShearX ShearY TranslateXRel TranslateYRel"
).split()
_RAND_INCREASING_OPS = (
    "AutoContrast Equalize Invert Rotate PosterizeIncreasing SolarizeIncreasing SolarizeAdd ColorIncreasing "
    "ContrastIncreasing BrightnessIncreasing SharpnessIncreasing ShearX ShearY TranslateXRel TranslateYRel"
).split()

# AutoAugment's ImageNet policy (arXiv 1805.09501), as timm's auto_augment_policy_original: 25 sub-policies of two
# (op, probability, magnitude) each; one sub-policy per sample.
_ORIGINAL_POLICY = [
    [("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)],
    [("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)],
    [("Equalize", 0.8, 8), ("Equalize", 0.6, 3)],
    [("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)],
    [("Equalize", 0.4, 7), ("Solarize", 0.2, 4)],
    [("Equalize", 0.4, 4), ("Rotate", 0.8, 8)],
    [("Solarize", 0.6, 3), ("Equalize", 0.6, 7)],
    [("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)],
    [("Rotate", 0.2, 3), ("Solarize", 0.6, 8)],
    [("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)],
    [("Rotate", 0.8, 8), ("Color", 0.4, 0)],
    [("Rotate", 0.4, 9), ("Equalize", 0.6, 2)],
    [("Equalize", 0.0, 7), ("Equalize", 0.8, 8)],
    [("Invert", 0.6, 4), ("Equalize", 1.0, 8)],
    [("Color", 0.6, 4), ("Contrast", 1.0, 8)],
    [("Rotate", 0.8, 8), ("Color", 1.0, 2)],
    [("Color", 0.8, 8), ("Solarize", 0.8, 7)],
    [("Sharpness", 0.4, 7), ("Invert", 0.6, 8)],
    [("ShearX", 0.6, 5), ("Equalize", 1.0, 9)],
    [("Color", 0.4, 0), ("Equalize", 0.6, 3)],
    [("Equalize", 0.4, 7), ("Solarize", 0.2, 4)],
    [("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)],
    [("Invert", 0.6, 4), ("Equalize", 1.0, 8)],
    [("Color", 0.6, 4), ("Contrast", 1.0, 8)],
    [("Equalize", 0.8, 8), ("Equalize", 0.6, 3)],
]

# torchvision's TrivialAugmentWide: (op, largest magnitude of its 31 bins, randomly negated).
_TA_BINS = 31
_TA_WIDE = [
    ("identity", 0.0, False),
    ("shear_x", 0.99, True),
    ("shear_y", 0.99, True),
    ("translate_x", 32.0, True),
    ("translate_y", 32.0, True),
    ("rotate", 135.0, True),
    ("brightness", 0.99, True),
    ("color", 0.99, True),
    ("contrast", 0.99, True),
    ("sharpness", 0.99, True),
    ("posterize", 0.0, False),
    ("solarize", 255.0, False),
    ("auto_contrast", 0.0, False),
    ("equalize", 0.0, False),
]

POLICY_HELP = (
    "null, a RandAugment string 'rand-m<M>[-n<N>][-mstd<S>][-mmax<X>][-inc<0|1>][-p<P>]' (timm's, e.g. "
    "'rand-m9-mstd0.5-inc1'), 'ta_wide' (TrivialAugmentWide) or 'original[-mstd<S>]' (AutoAugment's ImageNet policy)"
)


@dataclass(frozen=True)
class Policy:
    """A parsed data.auto_augment: kind 'rand' | 'ta_wide' | 'original' and timm's hyperparameters."""

    kind: str
    num_layers: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float = _DENOM
    prob: float = 0.5
    increasing: bool = False

    @property
    def slots(self) -> int:
        """Op slots per sample in a plan."""
        return {"rand": self.num_layers, "ta_wide": 1, "original": 2}[self.kind]


def parse_policy(text: str | None) -> Policy | None:
    """data.auto_augment -> Policy (None when off); an unknown string or key raises ValueError naming the forms."""
    if text is None or text == "":
        return None
    parts = str(text).split("-")
    head, keys = parts[0], parts[1:]
    if head == "ta_wide" and not keys:
        return Policy("ta_wide")
    if head not in ("rand", "original"):
        raise ValueError(f"data.auto_augment={text!r} is not supported: expected {POLICY_HELP}")
    fields: dict = {}
    allowed = {"m", "n", "mstd", "mmax", "inc", "p"} if head == "rand" else {"mstd"}
    for key_value in keys:
        match = re.fullmatch(r"([a-z]+)(\d.*)", key_value)
        key, value = match.groups() if match else (key_value, "")
        if key not in allowed:
            raise ValueError(f"data.auto_augment={text!r}: unknown part {key_value!r}; expected {POLICY_HELP}")
        try:
            number = float(value)
        except ValueError as err:
            raise ValueError(f"data.auto_augment={text!r}: {key_value!r} needs a number after {key!r}") from err
        if key == "mstd":
            fields["magnitude_std"] = math.inf if number > 100 else number  # timm: > 100 means uniform
        elif key == "mmax":
            fields["magnitude_max"] = number
        elif key == "inc":
            fields["increasing"] = bool(number)
        elif key == "m":
            fields["magnitude"] = float(int(number))
        elif key == "n":
            fields["num_layers"] = int(number)
        else:
            fields["prob"] = number
    policy = Policy(head, **fields)
    if policy.num_layers < 1 or not 0.0 <= policy.prob <= 1.0 or policy.magnitude_std < 0:
        raise ValueError(f"data.auto_augment={text!r}: need n >= 1, 0 <= p <= 1 and mstd >= 0")
    return policy


# Stream indices (transforms.sample_uniforms) after the crops': erasing, jitter, then 5 per op slot.
ERASE_ATTEMPTS = 10
ERASE_FIRST = NUM_DRAWS
ERASE_COUNT = 1 + 2 * ERASE_ATTEMPTS + 3  # apply, (area, log-aspect) x 10, top, left, noise seed
JITTER_FIRST = ERASE_FIRST + ERASE_COUNT
JITTER_COUNT = 4  # brightness, contrast, saturation factors, order
SLOTS_FIRST = JITTER_FIRST + JITTER_COUNT
SLOT_COUNT = 5  # op choice, apply, two for the Gaussian magnitude noise, sign

# torchvision's ColorJitter order is a permutation of its transforms; ours of (brightness, contrast, saturation).
JITTER_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


@dataclass
class AugmentPlan:
    """What augment_plan drew for a batch: ``ops`` / ``params`` [n, slots] (op ids into OPS, parameters in the
    op's unit; identity where a slot was not applied), ``jitter`` [n, 3] factors (brightness, contrast, saturation;
    all 1 when off) and ``jitter_order`` [n] (index into JITTER_ORDERS)."""

    ops: np.ndarray
    params: np.ndarray
    jitter: np.ndarray
    jitter_order: np.ndarray

    def row(self, i: int) -> "AugmentPlan":
        return AugmentPlan(self.ops[i], self.params[i], self.jitter[i], self.jitter_order[i])


def needs_plan(policy: Policy | None, color_jitter: float) -> bool:
    """Whether a per-sample pixel op (auto_augment or color_jitter) runs at all."""
    return policy is not None or color_jitter > 0


def _gauss(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normals from pairs of uniforms (Box-Muller; 1 - u1 keeps the log finite)."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)


def _timm_param(name: str, magnitude: float, negate: bool, img_size: int) -> tuple[int, float]:
    op, level_fn, signed = _TIMM_OPS[name]
    value = float(level_fn(magnitude))
    if signed and negate:
        value = -value
    if name in _INCREASING_ENHANCE:
        value = max(0.1, 1.0 + value)
    if op in ("translate_x", "translate_y"):
        value *= img_size  # timm: a fraction of the image width (x) or height (y); images are square here
    return OP_ID[op], value


def _timm_magnitude(policy: Policy, magnitude: float, u1: float, u2: float) -> float:
    """timm's AugmentOp magnitude: Gaussian noise of std mstd (uniform in [0, M] for mstd = inf), clipped."""
    if policy.magnitude_std == math.inf:
        magnitude = u1 * magnitude
    elif policy.magnitude_std > 0:
        magnitude = magnitude + policy.magnitude_std * float(_gauss(np.array(u1), np.array(u2)))
    return max(0.0, min(magnitude, policy.magnitude_max))


# The bins of each TrivialAugmentWide op (torch's float32 linspace, as torchvision's), made once; -1.0: solarize's
# descending bins.
_TA_LEVELS = {top: torch.linspace(0.0, top, _TA_BINS).tolist() for _, top, _ in _TA_WIDE}
_TA_LEVELS[-1.0] = torch.linspace(1.0, 0.0, _TA_BINS).tolist()


def _ta_param(u_op: float, u_bin: float, u_sign: float) -> tuple[int, float]:
    op, top, signed = _TA_WIDE[int(u_op * len(_TA_WIDE))]
    b = int(u_bin * _TA_BINS)
    if op == "posterize":
        return OP_ID[op], float(8 - int(round(b / ((_TA_BINS - 1) / 6))))
    if op == "solarize":
        return OP_ID[op], 255.0 * _TA_LEVELS[-1.0][b]
    value = _TA_LEVELS[top][b]  # torch's float32 bins, as torchvision's
    if signed and u_sign < 0.5:
        value = -value
    if op in ("brightness", "color", "contrast", "sharpness"):
        value += 1.0
    if op in ("translate_x", "translate_y"):
        value = float(int(value))  # torchvision truncates the translation to whole pixels
    return OP_ID[op], value


def augment_plan(
    policy: Policy | None, color_jitter: float, seed: int, epoch: int, positions: np.ndarray, img_size: int
) -> AugmentPlan:
    """The auto_augment ops and colour jitter of the samples at ``positions`` (train images of ``img_size``)."""
    n, slots = len(positions), policy.slots if policy is not None else 0
    ops = np.zeros((n, slots), dtype=np.int32)
    params = np.zeros((n, slots), dtype=np.float64)
    jitter = np.ones((n, 3), dtype=np.float32)
    order = np.zeros(n, dtype=np.int32)
    if color_jitter > 0:
        u = sample_uniforms(seed, epoch, positions, JITTER_COUNT, JITTER_FIRST)
        lo, hi = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter
        jitter[:] = lo + (hi - lo) * u[:, :3]
        order[:] = (u[:, 3] * len(JITTER_ORDERS)).astype(np.int32)
    if policy is None:
        return AugmentPlan(ops, params, jitter, order)
    u = sample_uniforms(seed, epoch, positions, slots * SLOT_COUNT, SLOTS_FIRST).reshape(n, slots, SLOT_COUNT)
    for i in range(n):
        if policy.kind == "original":
            sub_policy = _ORIGINAL_POLICY[int(u[i, 0, 0] * len(_ORIGINAL_POLICY))]
        for k in range(slots):
            u_op, u_apply, u_g1, u_g2, u_sign = u[i, k]
            if policy.kind == "ta_wide":
                ops[i, k], params[i, k] = _ta_param(u_op, u_apply, u_sign)
                continue
            if policy.kind == "rand":
                names = _RAND_INCREASING_OPS if policy.increasing else _RAND_OPS
                name, prob, magnitude = names[int(u_op * len(names))], policy.prob, policy.magnitude
            else:
                name, prob, magnitude = sub_policy[k]
            if u_apply >= prob:  # timm skips an op when random() > prob
                continue
            magnitude = _timm_magnitude(policy, magnitude, u_g1, u_g2)
            ops[i, k], params[i, k] = _timm_param(name, magnitude, u_sign > 0.5, img_size)
    return AugmentPlan(ops, params, jitter, order)


_INTERP = {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}


def affine_thetas(ops: np.ndarray, values: np.ndarray, height: int, width: int) -> np.ndarray:
    """The [m, 2, 3] matrices of geometric ops (op ids into OPS; any other id is the identity) for
    ``F.affine_grid`` (normalized coordinates, output -> source), in torchvision's conventions. Derived in pixel
    coordinates about the image centre (x right, y down), where the source of output pixel p is A p + t: rotate by
    ``value`` degrees counter-clockwise, shear about the top-left corner (source x = x + f y from that corner, y
    likewise), translate by ``value`` pixels."""
    ops, values = np.asarray(ops), np.asarray(values, dtype=np.float64)
    m = len(ops)
    a = np.tile(np.eye(2), (m, 1, 1))
    t = np.zeros((m, 2))
    rotate = ops == OP_ID["rotate"]
    radians = np.radians(np.where(rotate, values, 0.0))
    cos, sin = np.cos(radians), np.sin(radians)
    a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = cos, -sin, sin, cos
    shear_x, shear_y = ops == OP_ID["shear_x"], ops == OP_ID["shear_y"]
    a[:, 0, 1] += np.where(shear_x, values, 0.0)
    a[:, 1, 0] += np.where(shear_y, values, 0.0)
    t[:, 0] = np.where(shear_x, values * height / 2, 0.0) - np.where(ops == OP_ID["translate_x"], values, 0.0)
    t[:, 1] = np.where(shear_y, values * width / 2, 0.0) - np.where(ops == OP_ID["translate_y"], values, 0.0)
    scale = np.array([width / 2, height / 2])  # pixels = scale * normalized
    theta = np.empty((m, 2, 3))
    theta[:, :, :2] = a * scale[None, None, :] / scale[None, :, None]
    theta[:, :, 2] = t / scale
    return theta


def affine_theta(op: str, value: float, height: int, width: int) -> np.ndarray:
    """affine_thetas of one op by name ('identity' or one of GEOMETRIC)."""
    if op != "identity" and op not in GEOMETRIC:
        raise ValueError(f"{op!r} is not a geometric op")
    return affine_thetas(np.array([OP_ID[op]]), np.array([value]), height, width)[0]


def affine_images(images: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Each uint8 NCHW image warped by its ``theta`` [n, 2, 3] (affine_theta) in one ``grid_sample``, as
    torchvision's tensor affine: pixels from outside the image take ``fill`` [C] (blended by a sampled mask of
    ones), rounded to uint8; bicubic's overshoot is clamped to [0, 255] (and the mask to [0, 1])."""
    n, c, h, w = images.shape
    mode = "nearest" if interpolation == "nearest" else interpolation
    grid = torch.nn.functional.affine_grid(theta.float(), [n, c, h, w], align_corners=False)
    planes = torch.cat([images.float(), images.new_ones((n, 1, h, w), dtype=torch.float32)], dim=1)
    warped = torch.nn.functional.grid_sample(planes, grid, mode=mode, padding_mode="zeros", align_corners=False)
    out, mask = warped[:, :c], warped[:, c:]
    fill = fill.view(1, c, 1, 1).float()
    if mode == "nearest":
        out = torch.where(mask < 0.5, fill, out)
    else:
        out = (out - fill).mul_(mask.clamp_(0.0, 1.0)).add_(fill)
    return out.clamp_(0.0, 255.0).round_().to(torch.uint8)


def _apply_op(img: torch.Tensor, op: str, value: float, interpolation: str, fill: list[float]) -> torch.Tensor:
    """One op on a uint8 CHW tensor, with torchvision.transforms.v2's functional ops (as its RandAugment)."""
    if op in GEOMETRIC and interpolation not in _INTERP:  # bicubic: torchvision's tensor ops have no such mode
        theta = torch.from_numpy(affine_theta(op, value, img.shape[-2], img.shape[-1]))[None]
        return affine_images(img[None], theta, torch.tensor(fill), interpolation)[0]
    interp = _INTERP.get(interpolation)
    if op == "identity":
        return img
    if op == "auto_contrast":
        return TF.autocontrast(img)
    if op == "equalize":
        return TF.equalize(img)
    if op == "invert":
        return TF.invert(img)
    if op == "rotate":
        return TF.rotate(img, value, interpolation=interp, fill=fill)
    if op == "posterize":
        return TF.posterize(img, int(value))
    if op == "solarize":  # timm's threshold 256 (magnitude 10) inverts nothing; torchvision refuses it
        return img if value > 255 else TF.solarize(img, value)
    if op == "solarize_add":  # timm's: add to the pixels below 128, saturating (no torchvision op)
        return torch.where(img < 128, (img.to(torch.int16) + int(value)).clamp_(0, 255).to(torch.uint8), img)
    if op == "color":
        return TF.adjust_saturation(img, value)
    if op == "contrast":
        return TF.adjust_contrast(img, value)
    if op == "brightness":
        return TF.adjust_brightness(img, value)
    if op == "sharpness":
        return TF.adjust_sharpness(img, value)
    if op in ("shear_x", "shear_y"):
        angle = math.degrees(math.atan(value))
        shear = [angle, 0.0] if op == "shear_x" else [0.0, angle]
        return TF.affine(
            img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=interp, fill=fill, center=[0, 0]
        )
    translate = [value, 0.0] if op == "translate_x" else [0.0, value]
    return TF.affine(img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=interp, fill=fill)


def apply_jitter(img: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
    """torchvision's ColorJitter with the plan's factors and order on a uint8 CHW tensor."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for j in JITTER_ORDERS[int(plan.jitter_order)]:
        if plan.jitter[j] != 1.0:
            img = adjust[j](img, float(plan.jitter[j]))
    return img


def apply_ops(img: torch.Tensor, plan: AugmentPlan, interpolation: str, fill: Sequence[float]) -> torch.Tensor:
    """One sample's plan (``plan.row(i)``) on a uint8 CHW tensor: the auto_augment slots in order, then colour
    jitter (timm's order when both are forced on)."""
    for op, value in zip(plan.ops.tolist(), plan.params.tolist()):
        img = _apply_op(img, OPS[op], value, interpolation, list(fill))
    return apply_jitter(img, plan)


def erase_boxes(probability: float, seed: int, epoch: int, positions: np.ndarray, img_size: int) -> np.ndarray:
    """timm's RandomErasing boxes (probability, area 2-33%, log-uniform aspect 0.3-3.3, ten attempts) of the
    samples at ``positions``: int64 [n, 5] (top, left, height, width, noise seed); height 0 = no box."""
    n = len(positions)
    boxes = np.zeros((n, 5), dtype=np.int64)
    if probability <= 0:
        return boxes
    u = sample_uniforms(seed, epoch, positions, ERASE_COUNT, ERASE_FIRST)
    area = float(img_size * img_size)
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    for i in range(n):
        if u[i, 0] >= probability:
            continue
        for k in range(ERASE_ATTEMPTS):
            target = area * (0.02 + (1 / 3 - 0.02) * u[i, 1 + 2 * k])
            aspect = math.exp(log_lo + (log_hi - log_lo) * u[i, 2 + 2 * k])
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w < img_size and 0 < h < img_size:
                top = int(u[i, -3] * (img_size - h + 1))
                left = int(u[i, -2] * (img_size - w + 1))
                boxes[i] = top, left, h, w, int(u[i, -1] * (1 << 53))
                break
    return boxes


# Random erasing's noise: a fixed pool of N(0, 1) values (made once per process and device from a fixed seed, the
# same on every device); a box reads C * h * w consecutive values from an offset its noise seed picks.
_POOL_SIZE = 1 << 22
_POOL_SEED = 0x5EED_E2A5E
_pools: dict[torch.device, torch.Tensor] = {}


def _noise_pool(device: torch.device) -> torch.Tensor:
    pool = _pools.get(device)
    if pool is None:
        generator = torch.Generator().manual_seed(_POOL_SEED)
        pool = _pools[device] = torch.randn(_POOL_SIZE, generator=generator).to(device)
    return pool


def _noise_offsets(noise_seeds: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Where each box's noise starts in the pool: a mix of its seed, so that the box fits."""
    z = noise_seeds.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(32)
    return (z % (_POOL_SIZE - sizes).astype(np.uint64)).astype(np.int64)


def erase_noise(noise_seed: int, channels: int, height: int, width: int) -> torch.Tensor:
    """The [channels, height, width] N(0, 1) noise erase_batch writes into a box of that size with that seed."""
    size = channels * height * width
    start = int(_noise_offsets(np.array([noise_seed]), np.array([size]))[0])
    return _noise_pool(torch.device("cpu"))[start : start + size].view(channels, height, width)


def erase_batch(images: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """Fills each sample's box of a normalized NCHW batch, in place, with its seed's N(0, 1) noise (``erase_noise``,
    the same on every device), all boxes in one go: their numbers reach the device in one copy; the samples with a
    box are gathered, their boxes filled by one masked write and scattered back."""
    rows = np.flatnonzero(boxes[:, 2] > 0)
    if len(rows) == 0:
        return images
    _, channels, height, width = images.shape
    top, left, h, w, seeds = boxes[rows].T
    offsets = _noise_offsets(seeds, channels * h * w)
    host = np.stack([rows, top, left, h, w, offsets])  # [6, m]
    row, top_t, left_t, h_t, w_t, offset = host_to_device(torch.tensor(host), images.device).view(6, -1, 1, 1, 1)
    device = images.device
    y = torch.arange(height, device=device).view(1, 1, height, 1) - top_t  # within the box
    x = torch.arange(width, device=device).view(1, 1, 1, width) - left_t
    c = torch.arange(channels, device=device).view(1, channels, 1, 1)
    inside = (y >= 0) & (y < h_t) & (x >= 0) & (x < w_t)
    index = torch.where(inside, ((c * h_t + y) * w_t + offset) + x, 0)  # one full-size add
    noise = _noise_pool(device).take(index).to(images.dtype)
    row = row.view(-1)
    images.index_copy_(0, row, torch.where(inside, noise, images.index_select(0, row)))
    return images


# Batched ops (TrainAugment.apply_batch): uint8 NCHW images of the samples that drew the op and their per-sample
# parameters as float32 [m] tensors; the arithmetic of torchvision's v2 kernels (apply_ops, the reference), with
# the scalar turned into a per-sample factor that broadcasts.
def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0.0, 255.0).to(torch.uint8)  # truncates, as torchvision's blends


def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's luma of a float NCHW RGB batch, floored as for uint8 images: [m, 1, H, W]."""
    return x[:, 0:1].mul(0.2989).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114).floor_()


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return _to_uint8(x.float().mul_(factor).add_(other * (1.0 - factor)))


def _brightness(x, factor):
    return _to_uint8(x.float().mul_(factor.view(-1, 1, 1, 1)))


def _saturation(x, factor):
    return _blend(x, _grey(x.float()), factor)


def _contrast(x, factor):
    return _blend(x, _grey(x.float()).mean(dim=(-3, -2, -1), keepdim=True), factor)


def _sharpness(x, factor, kernel):
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    out = x.float()
    blurred = torch.nn.functional.conv2d(out, kernel, groups=x.shape[1]).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.add_((blurred - inner).mul_(1.0 - factor.view(-1, 1, 1, 1)))
    return _to_uint8(out)


def _auto_contrast(x, _):
    out = x.float()
    lo, hi = out.amin(dim=(-2, -1), keepdim=True), out.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, 1.0, (hi - lo).mul_(1.0 / 255))
    return _to_uint8(out.sub_(torch.where(flat, 0.0, lo)).div_(scale))


def _posterize(x, mask):
    return x & mask.to(torch.uint8).view(-1, 1, 1, 1)  # the mask of the bits kept (batch_passes)


def _solarize(x, threshold):
    return torch.where(x >= threshold.view(-1, 1, 1, 1), x.bitwise_not(), x)


def _solarize_add(x, amount):
    added = (x.to(torch.int16) + amount.to(torch.int16).view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)
    return torch.where(x < 128, added, x)


_BATCH_OPS = {
    "auto_contrast": _auto_contrast,
    "equalize": lambda x, _: TF.equalize(x),  # per image and channel already (histograms by scatter_add, cumsum)
    "invert": lambda x, _: x.bitwise_not(),
    "posterize": _posterize,
    "solarize": _solarize,
    "solarize_add": _solarize_add,
    "color": _saturation,
    "contrast": _contrast,
    "brightness": _brightness,
}
_JITTER_OPS = ("brightness", "contrast", "color")  # plan.jitter's columns, in the names of the ops above


@dataclass
class _Pass:
    """One op over the samples ``rows`` of a batch; its rows and parameters sit in the batch's packed tensor at
    [start, start + m) and [start + m, start + m + m * width)."""

    op: str
    start: int
    m: int
    width: int


class _Packer:
    """Gathers the passes of one batch and every number they need into one float32 host array."""

    def __init__(self):
        self.passes: list[_Pass] = []
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, op: str, rows: np.ndarray, params: np.ndarray) -> None:
        if len(rows) == 0:
            return
        params = params.reshape(len(rows), -1)
        self.passes.append(_Pass(op, self.size, len(rows), params.shape[1]))
        self.parts += [rows.astype(np.float32), params.astype(np.float32).ravel()]
        self.size += len(rows) * (1 + params.shape[1])

    def constant(self, values: np.ndarray) -> int:
        """Appends constants; returns their offset."""
        start = self.size
        self.parts.append(np.asarray(values, dtype=np.float32).ravel())
        self.size += self.parts[-1].size
        return start


def batch_passes(plan: AugmentPlan, height: int, width: int) -> _Packer:
    """The passes of apply_batch for a batch's plan, in order: per auto_augment slot one pass per op type drawn
    there (the geometric ones together: one affine), then colour jitter by position in its order (one pass per
    adjustment and position). Host work only, vectorized over the samples."""
    packer = _Packer()
    geometric = [OP_ID[g] for g in GEOMETRIC]
    for k in range(plan.ops.shape[1]):
        ops, params = plan.ops[:, k], plan.params[:, k]
        rows = np.flatnonzero(np.isin(ops, geometric))
        packer.add("affine", rows, affine_thetas(ops[rows], params[rows], height, width))
        for op_id in np.unique(ops):
            name = OPS[op_id]
            if name != "identity" and name not in GEOMETRIC:
                rows = np.flatnonzero(ops == op_id)
                value = params[rows]
                if name == "posterize":  # bits kept -> their mask (8 bits: 255)
                    bits = np.clip(value.astype(np.int64), 0, 8)
                    value = ((1 << bits) - 1) << (8 - bits)
                packer.add(name, rows, value)
    orders = np.array(JITTER_ORDERS)[plan.jitter_order]  # [n, 3]: which adjustment at each position
    for position in range(3):
        for j, name in enumerate(_JITTER_OPS):
            rows = np.flatnonzero((orders[:, position] == j) & (plan.jitter[:, j] != 1.0))
            packer.add(name, rows, plan.jitter[rows, j])
    return packer


class TrainAugment:
    """The train-time augmentation of one loader, from its DataConfig and seed: the resolution of each epoch
    (progressive resizing), the plans, the pixel ops and random erasing; shared by the backends."""

    def __init__(self, cfg, seed: int):
        self.policy = parse_policy(cfg.auto_augment)
        self.color_jitter, self.erasing = float(cfg.color_jitter), float(cfg.random_erasing)
        self.interpolation, self.seed = cfg.interpolation, seed
        self.fill = [float(round(255 * m)) for m in cfg.mean]
        self._size = (cfg.img_size, cfg.progressive_sizes, cfg.progressive_epochs, cfg.progressive_step)
        self.pixel_ops = needs_plan(self.policy, self.color_jitter)

    def img_size(self, epoch: int) -> int:
        return train_img_size(*self._size, epoch)

    def plan(self, epoch: int, positions: np.ndarray) -> AugmentPlan | None:
        if not self.pixel_ops:
            return None
        return augment_plan(self.policy, self.color_jitter, self.seed, epoch, positions, self.img_size(epoch))

    def apply_hwc(self, image: np.ndarray, plan: AugmentPlan) -> np.ndarray:
        """apply_ops on a uint8 HWC array (the torchvision backend's decoded sample)."""
        out = apply_ops(
            torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), plan, self.interpolation, self.fill
        )
        return out.permute(1, 2, 0).numpy()

    def apply_batch(self, images: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
        """apply_ops's result for every sample of a uint8 NHWC batch (any device), in place, batched: each op type
        of each slot makes one pass over the samples that drew it (rotate / shear / translate one affine), with
        per-sample parameters that broadcast; every row index and parameter of the batch reaches the device in one
        copy that does not block the host. ``plan`` holds the batch's rows in order. The DALI backend's one
        augmenting function, for its 'torch' and 'graph' paths; equal to apply_ops per sample (the torchvision
        backend's path) up to float rounding (tests/data/test_augment_batched.py)."""
        n, height, width, channels = images.shape
        packer = batch_passes(plan, height, width)
        if not packer.passes:
            return images
        fill_at = packer.constant(self.fill)
        kernel_at = packer.constant(np.array([1, 1, 1, 1, 5, 1, 1, 1, 1]) / 13.0)  # torchvision's sharpness blur
        packed = host_to_device(torch.tensor(np.concatenate(packer.parts)), images.device)
        fill = packed[fill_at : fill_at + channels]
        kernel = packed[kernel_at : kernel_at + 9].view(1, 1, 3, 3).expand(channels, 1, 3, 3).contiguous()
        batch = images.permute(0, 3, 1, 2).contiguous()  # NCHW: each pass gathers and scatters whole planes
        for step in packer.passes:
            rows = packed[step.start : step.start + step.m].long()
            params = packed[step.start + step.m : step.start + step.m * (1 + step.width)].view(step.m, step.width)
            x = batch.index_select(0, rows)
            if step.op == "affine":
                out = affine_images(x, params.view(step.m, 2, 3), fill, self.interpolation)
            elif step.op == "sharpness":
                out = _sharpness(x, params[:, 0], kernel)
            else:
                out = _BATCH_OPS[step.op](x, params[:, 0])
            batch.index_copy_(0, rows, out)
        images.copy_(batch.permute(0, 2, 3, 1))
        return images

    def erase(self, images: torch.Tensor, epoch: int, positions: np.ndarray) -> torch.Tensor:
        """Random erasing of a normalized NCHW batch of the samples at ``positions`` (no-op when off)."""
        if self.erasing <= 0:
            return images
        return erase_batch(images, erase_boxes(self.erasing, self.seed, epoch, positions, images.shape[-1]))
