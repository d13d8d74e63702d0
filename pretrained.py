"""The published-model format, known here and nowhere else: a folder that shares one trained DepthNet the way
the field does (a Hugging Face Hub model repository, torch.hub), as checkpoint.py owns the training checkpoint.

A model folder holds three files:
  config.json        the format's name and version, DepthNet's constructor arguments (model_args), the input
                     size it was trained at and its depth conventions (min_depth, max_depth, depth_scale);
                     no ImageNet weights name, so that building the network never downloads anything
  model.safetensors  the network's weights, the moving average when training kept one (--ema); no optimiser state
  README.md          the model card (modelcard.py): what the model is, how it was trained, its last val figures

Reading one runs no code: JSON and safetensors only. read_pretrained returns the checkpoint-like dict
{model_args, input_size, depth, model} that checkpoint.py's helpers take, so that whatever loads a checkpoint
loads a folder the same way. A Hub id (OWNER/NAME) is fetched into huggingface_hub's cache first; only
config.json and model.safetensors are fetched.
"""
import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile

import torch

from checkpoint import input_size, load_checkpoint, model_args, network_state, trained_conventions
from conventions import FIELDS as DEPTH_KEYS
from utils import CheckpointError, UserError, current_umask, first_line

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
FOLDER_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
FORMAT, FORMAT_VERSION = "depthnet", 1
INSTALL_HINT = "pip install -r requirements.txt"
# A Hub repository id: OWNER/NAME. A path that names a checkpoint file is never taken for one.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".json")


def is_hub_id(name):
    """True if `name` reads as OWNER/NAME, a Hugging Face Hub repository, and not as a local path: nothing of that
    name exists here, not even a folder OWNER (runs/NAME mistyped is a path), and it names no checkpoint file."""
    name = os.fspath(name)
    return (bool(HUB_ID.match(name)) and not name.lower().endswith(FILE_SUFFIXES) and not os.path.exists(name)
            and not os.path.isdir(name.split("/")[0]))


def is_published(path):
    """True if --ckpt `path` is a model folder or a Hub id rather than a checkpoint file."""
    return os.path.isdir(path) or is_hub_id(path)


def open_trained(path, map_location="cpu", mmap=False):
    """What --ckpt `path` holds, as a checkpoint dict: a checkpoint file (mmap: its tensors mapped, not read), a
    model folder or a Hub id."""
    return read_pretrained(path) if is_published(path) else load_checkpoint(path, map_location, mmap)


def read_pretrained(name_or_path, **hub_options):
    """{model_args, input_size, depth, model, card} of a model folder or Hub id, checked: the one-line CheckpointError
    of the first thing wrong (a file missing, a config of another architecture, a truncated file, a tensor
    missing, extra or of another shape)."""
    folder = resolve(name_or_path, **hub_options)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        runs = [n for n in ("best.pt", "last.pt") if os.path.isfile(os.path.join(folder, n))]
        hint = (f"; for the training run's checkpoint give {os.path.join(folder, runs[0])}" if runs else "")
        raise CheckpointError(f"model folder {name_or_path} has no {' and no '.join(missing)}: a folder written by "
                              "`python main.py --export pretrained` holds config.json, model.safetensors and README.md"
                              + hint)
    config_path = os.path.join(folder, CONFIG_FILE)
    config = checked_config(read_json(config_path), config_path)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    state = read_weights(weights_path)
    check_tensors(state, expected_tensors(config["model_args"]), weights_path)
    return {"model_args": config["model_args"], "input_size": config["input_size"], "depth": config["depth"],
            "model": state, "card": read_card(folder)}


def read_card(folder):
    """The model card's text, or None where the folder has none (a Hub model fetched without it)."""
    path = os.path.join(folder, CARD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def resolve(name_or_path, revision=None, cache_dir=None, token=None, local_files_only=False, force_download=False):
    """The local folder of a model folder or Hub id: a Hub model's config.json and model.safetensors are
    downloaded into huggingface_hub's cache (or found there: HF_HUB_OFFLINE=1 reads only the cache)."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if not is_hub_id(name):
        raise CheckpointError(f"{name}: no such model folder (nor a Hugging Face Hub id OWNER/NAME)")
    hf_hub_download = require_hub().hf_hub_download
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is imported; read here, it also holds when it is set
    # later in a process that has already imported it, instead of a network's retries.
    local_files_only = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        with hub_warnings_muted():  # its retries' warnings; the failure is told in one line below
            paths = [hf_hub_download(name, filename, revision=revision, cache_dir=cache_dir, token=token,
                                     local_files_only=local_files_only, force_download=force_download)
                     for filename in (CONFIG_FILE, WEIGHTS_FILE)]
    except Exception as err:  # offline, no such repository, no such file, refused, ...
        raise CheckpointError(f"{name}: no such checkpoint or model folder here, and the Hugging Face Hub did not "
                              f"give a model of that id ({type(err).__name__}: {first_line(err)})") from None
    return os.path.dirname(paths[0])


@contextlib.contextmanager
def hub_warnings_muted():
    """huggingface_hub's logger shows only errors for a while."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def require_hub():
    """huggingface_hub, or a one-line UserError saying how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"loading from or pushing to the Hugging Face Hub needs huggingface_hub: {INSTALL_HINT}"
                        ) from None
    return huggingface_hub


def require_safetensors():
    """safetensors.torch, or a one-line UserError saying how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(f"model folders (model.safetensors) need the safetensors package: {INSTALL_HINT}") from None
    return safetensors.torch


def read_json(path):
    """The JSON object in `path`, or a one-line CheckpointError."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is truncated or not JSON ({first_line(err)}); export the folder again") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not a model's config object")
    return value


def checked_config(config, path):
    """The config of a DepthNet folder with its values checked, or a CheckpointError naming what is wrong."""
    if config.get("format") != FORMAT:
        named = config.get("architectures") or config.get("model_type") or config.get("_class_name")
        what = f"another architecture ({named})" if named else f"no \"format\": \"{FORMAT}\" entry"
        raise CheckpointError(f"{path} describes {what}: not a DepthNet folder of this project")
    if not isinstance(config.get("format_version"), int) or config["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {config.get('format_version')!r}; this code reads version "
                              f"{FORMAT_VERSION} and before: update the code")
    from model import ENCODERS

    args = config.get("model_args")
    if (not isinstance(args, dict) or set(args) != {"encoder", "skips", "init_depth"}
            or args["encoder"] not in ENCODERS or not isinstance(args["skips"], bool)
            or not finite_number(args["init_depth"])):
        raise CheckpointError(f"{path}: model_args must be {{encoder: one of {', '.join(ENCODERS)}, skips: true or "
                              f"false, init_depth: a number}}, got {args!r}")
    size = config.get("input_size")
    sides = [size] if isinstance(size, int) else size
    if (not isinstance(sides, list) or len(sides) not in (1, 2)
            or not all(isinstance(v, int) and v >= 32 and v % 32 == 0 for v in sides)):
        raise CheckpointError(f"{path}: input_size must be a side S or [H, W], multiples of 32, got {size!r}")
    depth = config.get("depth")
    if (not isinstance(depth, dict) or set(depth) != set(DEPTH_KEYS) or not all(map(finite_number, depth.values()))
            or not 0 <= depth["min_depth"] < depth["max_depth"] or not depth["depth_scale"] > 0):
        raise CheckpointError(f"{path}: depth must be {{min_depth, max_depth, depth_scale}} with 0 <= min_depth < "
                              f"max_depth and depth_scale > 0, got {depth!r}")
    return config


def finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_weights(path):
    """The tensors of a safetensors file (memory-mapped, copy on write), or a one-line CheckpointError."""
    load_file = require_safetensors().load_file
    try:
        return load_file(path)
    except Exception as err:  # SafetensorError for a bad header or a short file, OSError, ...
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {first_line(err)}); export "
                              "the folder again") from None


def expected_tensors(args):
    """{name: (shape, dtype)} of the state dict of DepthNet(**args), built on the meta device: no weights drawn."""
    from model import DepthNet

    with torch.device("meta"):
        net = DepthNet(weights=None, **args)
    return {name: (tuple(t.shape), t.dtype) for name, t in net.state_dict().items()}


def check_tensors(state, expected, path):
    """Strict loading's check, each kind of difference in one line naming the file and the first tensors."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} (expected {expected[k][0]})" for k in expected
                if k in state and tuple(state[k].shape) != expected[k][0]]
    retyped = [f"{k} {state[k].dtype} (expected {expected[k][1]})" for k in expected
               if k in state and tuple(state[k].shape) == expected[k][0] and state[k].dtype != expected[k][1]]
    for names, problem in ((missing, "lacks {} tensor(s) of the network its config.json describes"),
                           (extra, "holds {} tensor(s) that the network its config.json describes has not"),
                           (reshaped, "holds {} tensor(s) of another shape than the network its config.json describes"),
                           (retyped, "holds {} tensor(s) of another dtype than the network its config.json describes")):
        if names:
            raise CheckpointError(f"{path} {problem.format(len(names))} (e.g. {', '.join(names[:3])}): export the "
                                  "folder again from the checkpoint")


def folder_config(args, size, depth):
    """config.json's object for a network of DepthNet(**args), trained at input `size` with conventions `depth`."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "DepthNet",
            "model_args": {"encoder": str(args["encoder"]), "skips": bool(args["skips"]),
                           "init_depth": float(args["init_depth"])},
            "input_size": size if isinstance(size, int) else [int(v) for v in size],
            "depth": {k: float(depth[k]) for k in DEPTH_KEYS}}


def write_pretrained(out_dir, args, size, depth, state, card):
    """Write a model folder: config.json, model.safetensors (fp32 tensors of `state`, on the CPU) and README.md
    (`card`). The files are written in a temporary folder beside `out_dir`, read back and compared with
    `state`, and only then moved into place; a folder that holds other files is refused."""
    check_output_folder(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(out_dir)) + ".", suffix=".tmp", dir=parent)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        require_safetensors().save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(folder_config(args, size, depth), f, indent=2)
            f.write("\n")
        with open(os.path.join(tmp, CARD_FILE), "w", encoding="utf-8") as f:
            f.write(card)
        check_round_trip(tmp, tensors)
        give_usual_modes(tmp)
        install_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_folder(out_dir):
    """Refuse to write a model folder over a file, or into a folder that holds files of its own (a run's folder
    has a config.json of another kind)."""
    if os.path.isfile(out_dir):
        raise UserError(f"{out_dir} is a file: give a folder to write the model to")
    if os.path.isdir(out_dir):
        others = sorted(set(os.listdir(out_dir)) - set(FOLDER_FILES))
        if others or (os.path.isfile(os.path.join(out_dir, CONFIG_FILE))
                      and read_json_or_none(os.path.join(out_dir, CONFIG_FILE)).get("format") != FORMAT):
            named = ", ".join(others[:3]) or CONFIG_FILE
            raise UserError(f"{out_dir} already holds other files ({named}): choose a new or empty folder for the "
                            "model")


def read_json_or_none(path):
    try:
        return read_json(path)
    except CheckpointError:
        return {}


def check_round_trip(folder, tensors):
    """Read the written folder back as any loader would and check that it holds exactly `tensors`."""
    written = read_pretrained(folder)["model"]
    differing = [k for k, v in tensors.items() if not torch.equal(written[k], v)]
    if differing:
        raise CheckpointError(f"the written weights differ from the checkpoint's ({', '.join(differing[:3])}); "
                              "nothing was written")


def give_usual_modes(folder):
    """mkdtemp makes a folder only its owner can read: give it and its files the modes of any new ones."""
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for name in FOLDER_FILES:
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def install_folder(tmp, out_dir):
    """Move a finished folder into place: one rename for a new folder, one per file over an old model folder."""
    if not os.path.exists(out_dir):
        os.replace(tmp, out_dir)
        return
    for name in FOLDER_FILES:
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))


def export_pretrained(ckpt_path, out_dir, size=None, depth=None):
    """--export pretrained: the model folder of checkpoint (or model folder) `ckpt_path`, with its model card.
    size, depth ({field: value}, None: not typed): what to record instead of what the checkpoint was trained
    with (typed options)."""
    from modelcard import model_card

    ckpt = open_trained(ckpt_path, mmap=True)
    args, size = model_args(ckpt), size or input_size(ckpt)
    depth = trained_conventions(ckpt).typed_over(depth, ckpt_path).as_dict()
    card = ckpt.get("card") or model_card(ckpt, ckpt_path, args, size, depth)  # a folder's card stays its own
    write_pretrained(out_dir, args, size, depth, network_state(ckpt), card)
    return ckpt
