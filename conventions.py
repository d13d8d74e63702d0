"""What a depth value means, defined once: the range that counts and how 16-bit depth files are scaled.

One small record travels with a run: main.py's options hold its fields, the checkpoint stores
it, the loss, the data and inference read it. Nothing else defines a depth constant, so that a
newcomer changes the paper's 20 m, say, in one place. Plain Python: importing it loads no torch.
"""
from dataclasses import asdict, dataclass, fields, replace

from utils import UserError


@dataclass(frozen=True)
class DepthConventions:
    """min_depth: ground truth at or below it (metres) is not measured (0 in every common format) and counts
    nowhere. max_depth: depth, and predictions, are clipped to [0, max_depth] metres (the paper's 20: its
    sky is stored as 100 m). depth_scale: a 16-bit depth PNG holds metres x this (1000: millimetres, NYU
    Depth v2's convention; KITTI's is 256)."""

    min_depth: float = 1e-3
    max_depth: float = 20.0
    depth_scale: float = 1000.0

    @classmethod
    def of(cls, holder):
        """The record of an object with min_depth, max_depth and depth_scale attributes (main.py's options)."""
        return cls(**{f.name: getattr(holder, f.name) for f in fields(cls)})

    @classmethod
    def from_dict(cls, values):
        """The record stored in a checkpoint or config (a dict); the paper's for fields it lacks."""
        return replace(PAPER, **{f.name: float(values[f.name]) for f in fields(cls) if f.name in (values or {})})

    def as_dict(self):
        return asdict(self)

    def overridden(self, **typed):
        """This record with the fields given a value (not None) replaced: typed options over a checkpoint's."""
        return replace(self, **{k: v for k, v in typed.items() if v is not None})

    def typed_over(self, typed, source):
        """The conventions in use with a trained model: this record, what `source` was trained with, with the
        options the user typed over it ({field: value}, None: not typed); a UserError when the minimum depth
        is then not below the maximum."""
        typed = typed or {}
        resolved = self.overridden(**typed)
        if not resolved.min_depth < resolved.max_depth:
            whose = ("--max-depth" if typed.get("max_depth") is not None
                     else f"the maximum depth {source} was trained with")
            raise UserError(f"--min-depth {resolved.min_depth:g} must be below {whose} ({resolved.max_depth:g} m): "
                            "lower --min-depth, or give a larger --max-depth")
        return resolved


# The paper's conventions: main.py's defaults, and those of checkpoints that do not record theirs.
PAPER = DepthConventions()
FIELDS = tuple(f.name for f in fields(DepthConventions))
