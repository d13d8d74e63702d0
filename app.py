"""A web page to try a trained model: python app.py --ckpt runs/demo/best.pt, then open http://127.0.0.1:7860.

Optional: needs Gradio (pip install -r requirements-app.txt). Upload or drop a photo (any
size; JPEG, PNG or whatever Pillow reads; RGB, RGBA or grayscale) or pick an example scene
made by synthetic.py, and the page shows:
  - the depth, colourised at the photo's own size on the fixed [0, max depth] scale of
    --predict's PNGs, with its colour bar in metres, a min / median / max readout, and
    the depth of any point you click;
  - a 3-D point cloud back-projected as --predict --ply does, with the field of view as a slider;
  - downloads: NAME.npy (metres), NAME_mm.png (16-bit millimetres) and NAME.ply, the very
    files --predict writes for the same photo.
The model is loaded once, at start-up, with the weights_only loading of every checkpoint
here (a model folder: JSON and safetensors); requests go through one queue that runs one at a
time, as the model has one device.
A file that is not a readable image gets a message in the page, and the server goes on.
"""
import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np

from main import HelpFormatter, check_model_options, input_size_option, repeated_paths
from main import build_parser as build_main_parser

# Gradio reports usage to its authors unless told not to; the page works offline and reports nothing.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

INSTALL_HINT = "pip install -r requirements-app.txt"
VIEWER_POINTS = 250_000  # a larger photo's 3-D view is drawn from every k-th pixel of every k-th row
# The .ply download holds at most this many points (every k-th pixel of a larger photo): 30 MB, where a
# photo at the --max-pixels limit would give 250 MB per request. --predict --ply writes every pixel.
PLY_POINTS = 2_000_000
VIEW_BACKGROUND = (0.1, 0.1, 0.12, 1.0)  # RGBA of the 3-D view: dark, so that points of any colour show
QUEUE_SIZE = 64  # requests that may wait for the model; Gradio refuses more, with a message
EXAMPLES = (("street", 3), ("street", 11), ("yard", 5))  # (style, seed) of the example scenes
EXAMPLE_SIZE = (288, 512)  # twice the data set's 144 × 256: the page is not tied to the training size
CSS = """
#colourbar .bar {height: 14px; border-radius: 3px}
#colourbar .ticks {display: flex; justify-content: space-between; font-size: 12px}
"""


# The options app.py shares with --predict (their names, types, choices and defaults are defined once, in
# build_parser), with the page's own words for each.
APP_HELP = {
    "ckpt": "required: the checkpoint written by training to serve on the page (e.g. runs/demo/best.pt), a model "
            "folder (--export pretrained) or a Hugging Face Hub id OWNER/NAME; several: their depth averaged",
    "image_size": "network input, S or H W (multiples of 32); default: the size the checkpoint was trained at",
    "device": "where the model runs; auto: CUDA when there is one",
    "amp": "dtype the weights are cast to once; auto: bf16 where the hardware runs it, else fp32",
    "cmap": "matplotlib colormap of the depth picture and its colour bar",
    "fov": "starting value of the page's slider: the horizontal field of view (degrees) of the camera the point "
           "cloud is back-projected with",
    "flip": "show the mean of each photo's depth and, mirrored back, its mirror image's (two forward passes)",
    "max_pixels": "refuse uploads with more pixels than this, read from the file's header before decoding; a larger "
                  "JPEG is decoded at the largest of 1/2, 1/4, 1/8 of its size that fits",
}


def build_parser():
    """Options of app.py, the web page to try a model: how to serve it, then --predict's own."""
    p = argparse.ArgumentParser(prog="app.py", formatter_class=HelpFormatter,
                                description="A web page to try a trained model: upload a photo, see its depth and "
                                            "a 3-D point cloud, download the depth (needs: pip install -r "
                                            "requirements-app.txt).")
    serve = p.add_argument_group("serving")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; 0.0.0.0 makes the page reachable from other machines")
    serve.add_argument("--port", type=int, default=7860, help="port to listen on")
    serve.add_argument("--max-upload-mb", type=float, default=20.0,
                       help="uploads larger than this many megabytes are refused")
    shared = p.add_argument_group("the model and what the page does with it")
    for action in build_main_parser()._actions:
        if action.dest not in APP_HELP:
            continue
        if action.nargs == 0:  # a flag
            shared.add_argument(*action.option_strings, dest=action.dest, action="store_true",
                                help=APP_HELP[action.dest])
        else:
            # No default size: like --predict, the page feeds the model the size it was trained at unless told.
            shared.add_argument(*action.option_strings, dest=action.dest, type=action.type, choices=action.choices,
                                nargs=action.nargs, default=None if action.dest == "image_size" else action.default,
                                metavar=action.metavar, help=APP_HELP[action.dest], required=action.dest == "ckpt")
    return p


def parse_options(argv=None):
    """app.py's options, checked as main.py checks those it shares."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    if not 0 < opts.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {opts.port}")
    if not opts.max_upload_mb > 0:
        parser.error(f"--max-upload-mb must be positive, got {opts.max_upload_mb}")
    check_model_options(parser, opts, cmap=True)
    repeated = repeated_paths(opts.ckpt or [])
    if repeated:
        parser.error(f"--ckpt names {repeated} more than once: an ensemble averages different checkpoints")
    opts.image_size = input_size_option(opts.image_size)
    return opts


class DepthPage:
    """The model behind the page, and what each request computes with it."""

    def __init__(self, opts):
        from inference import load

        self.opts = opts
        self.predictor = load(opts.ckpt, opts.device, opts.amp, flip=opts.flip, size=opts.image_size)
        # The range it was trained on: the scale of every depth picture here.
        self.max_depth = self.predictor.conventions.max_depth
        # The examples, and one folder per request, live here until the server stops.
        self.workdir = tempfile.mkdtemp(prefix="depth-app-")
        self.requests = os.path.join(self.workdir, "requests")
        os.makedirs(self.requests)

    def close(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def predict(self, rgb, shown=None):
        """Depth in metres of one HWC uint8 image, at its own size or at the photo's `shown` (H, W) when it was
        decoded smaller: --predict's computation for a batch of one."""
        return self.predictor.infer_image(rgb, shown)

    def request_folder(self):
        """A fresh folder for one request's files. Gradio copies what a request returns into its own
        cache as the request ends, so the folders of earlier requests are no longer needed."""
        for old in os.listdir(self.requests):
            shutil.rmtree(os.path.join(self.requests, old), ignore_errors=True)
        return tempfile.mkdtemp(dir=self.requests)

    def make_examples(self):
        """Paths of JPEG scenes from the synthetic generator, written once into the work folder."""
        from PIL import Image

        from synthetic import JPEG_QUALITY, render_scene

        paths = []
        for style, seed in EXAMPLES:
            rgb, _ = render_scene(np.random.default_rng(seed), style, *EXAMPLE_SIZE)
            paths.append(os.path.join(self.workdir, f"{style}_{seed}.jpeg"))
            Image.fromarray(rgb).save(paths[-1], quality=JPEG_QUALITY)
        return paths

    def on_photo(self, path, fov):
        """A new photo, or none: (depth picture, readout, 3-D view, downloads, state for the later events).

        A file that is not a readable image clears the outputs and says why in the readout.
        """
        from dataset import ImageError, read_picture

        if path is None:
            return None, "", None, None, None
        name = os.path.basename(path)  # Gradio keeps the uploaded file's own name
        try:
            rgb, shown = read_picture(path, self.opts.max_pixels, draft=True)  # a phone's JPEG: at 1/2ⁿ
        except ImageError as err:
            return (None, f"**Could not read {name}**: {err.reason}. Upload a JPEG or PNG photo.", None, None,
                    None)
        start = time.perf_counter()
        depth = self.predict(rgb, shown)
        state = {"name": name, "rgb": rgb, "depth": depth, "seconds": time.perf_counter() - start}
        files, view = self.write_files(state, fov)
        return files["png"], readout(depth, state["seconds"]), view, downloads(files), state

    def on_fov(self, state, fov):
        """The field of view changed: the point cloud again, for the view and the download."""
        if state is None:
            return None, None
        files, view = self.write_files(state, fov)
        return view, downloads(files)

    def on_click(self, state, xy):
        """The readout with the depth at pixel `xy` of the depth picture."""
        return "" if state is None else readout(state["depth"], state["seconds"], point=xy)

    def write_files(self, state, fov):
        """--predict's files for the state's photo (.npy, colour and 16-bit PNGs, .ply of at most PLY_POINTS
        points) in a fresh request folder; ({kind: path}, the .ply for the 3-D view: the download itself, or
        for a large photo every k-th pixel's point)."""
        from predict import image_output_paths, write_outputs, write_ply

        rgb, depth = state["rgb"], state["depth"]
        files = image_output_paths(state["name"], self.request_folder(), png16=True, ply=True)
        pictures = {k: v for k, v in files.items() if k != "ply"}
        write_outputs(pictures, depth, rgb, self.max_depth, self.opts.cmap, fov)
        write_ply(files["ply"], *every_kth_pixel(rgb, depth, PLY_POINTS), fov)
        if depth.size <= VIEWER_POINTS:
            return files, files["ply"]
        view = files["ply"].removesuffix(".ply") + "_view.ply"
        write_ply(view, *every_kth_pixel(rgb, depth, VIEWER_POINTS), fov)
        return files, view


def every_kth_pixel(rgb, depth, points):
    """(rgb, depth) of every k-th pixel of every k-th row, k the smallest that leaves at most `points` pixels;
    rgb may be smaller than depth (a photo decoded at 1/2ⁿ): each pixel then takes the colour it falls in."""
    from predict import colours_at

    step = int(np.ceil(np.sqrt(depth.size / points)))
    ys, xs = np.arange(0, depth.shape[0], step), np.arange(0, depth.shape[1], step)
    return colours_at(rgb, depth.shape, ys, xs), np.ascontiguousarray(depth[::step, ::step])


def downloads(files):
    return [files["npy"], files["png16"], files["ply"]]


def readout(depth, seconds, point=None):
    """Markdown: the depth's size, min / median / max, and the depth at a clicked point."""
    text = (f"**{depth.shape[1]} × {depth.shape[0]}** pixels, predicted in {seconds * 1000:.0f} ms. "
            f"Depth min **{depth.min():.2f} m**, median **{np.median(depth):.2f} m**, max **{depth.max():.2f} m**.")
    if point is None:
        return text + "  \nClick the depth picture to read the depth at a point."
    x, y = point
    return text + f"  \nAt the clicked point (x {x}, y {y}): **{depth[y, x]:.2f} m**."


def colour_bar_html(cmap, max_depth, ticks=5):
    """The colour bar of the depth picture as HTML: a CSS gradient through the colormap, ticks in metres."""
    from plots import colorize_depth

    stops = colorize_depth(np.linspace(0.0, max_depth, 33)[None], 0.0, max_depth, cmap)[0]
    gradient = ", ".join(f"rgb({r},{g},{b})" for r, g, b in stops)
    labels = "".join(f"<span>{v:g}</span>" for v in np.linspace(0.0, max_depth, ticks))
    return (f'<div class="bar" style="background: linear-gradient(to right, {gradient})"></div>'
            f'<div class="ticks">{labels}</div><div style="text-align:center;font-size:12px">depth (m)</div>')


def checkpoints_named(paths):
    """The page's words for its model: one checkpoint's file name, or an ensemble's."""
    names = ", ".join(f"`{os.path.basename(p)}`" for p in paths)
    return f"Checkpoint {names}" if len(paths) == 1 else f"Checkpoints {names} (their depth averaged)"


def build_page(page, gr):
    """The Gradio Blocks of the page, wired to `page` (a DepthPage); (blocks, theme)."""

    def on_click(state, evt: gr.SelectData):  # Gradio passes the clicked pixel by this annotation
        return page.on_click(state, tuple(int(v) for v in evt.index))

    from dataset import input_hw

    opts = page.opts
    # System fonts, no web fonts: the page works offline.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="Monocular depth", delete_cache=(600, 3600)) as blocks:
        gr.Markdown(f"## Monocular depth estimation\n"
                    f"{checkpoints_named(opts.ckpt)}, input {' × '.join(map(str, input_hw(page.predictor.size)))}, "
                    f"on {page.predictor.device}. "
                    f"Upload or drop a photo (JPEG or PNG, any size, at most {opts.max_upload_mb:g} MB), "
                    "or pick an example.")
        state = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column():
                photo = gr.Image(label="photo", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="photo")
                # The upload goes on untouched, image or not: read_rgb says what is wrong with it, where gr.Image
                # would fail first with a generic message. (Set on the instance: Gradio writes a .pyi stub beside
                # any module that subclasses a component.)
                photo.preprocess = lambda payload: None if payload is None else payload.path
                gr.Examples([[p] for p in page.make_examples()], inputs=photo, label="examples: synthetic scenes")
            with gr.Column():
                depth = gr.Image(label="depth, at the photo's size", type="filepath", format="png", interactive=False,
                                 buttons=["download", "fullscreen"], elem_id="depth")
                gr.HTML(colour_bar_html(opts.cmap, page.max_depth), elem_id="colourbar")
                info = gr.Markdown("", elem_id="readout")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                cloud = gr.Model3D(label="3-D point cloud (drag to turn, scroll to zoom)", display_mode="point_cloud",
                                   clear_color=VIEW_BACKGROUND, height=420, elem_id="cloud")
                fov = gr.Slider(10, 170, value=opts.fov, step=1, elem_id="fov",
                                label="horizontal field of view of the camera (degrees)")
            with gr.Column(scale=1):
                files = gr.File(label="downloads: depth in metres (.npy), in millimetres (16-bit PNG), "
                                      "point cloud (.ply)",
                                file_count="multiple", interactive=False, elem_id="downloads")
        # One concurrency group for every event that runs the model: one request at a time on its device.
        photo.change(page.on_photo, [photo, fov], [depth, info, cloud, files, state], concurrency_id="model")
        fov.release(page.on_fov, [state, fov], [cloud, files], concurrency_id="model")
        depth.select(on_click, [state], [info])
    return blocks, theme


def import_gradio():
    from utils import UserError

    try:
        import gradio
    except ImportError:
        raise UserError(f"app.py needs Gradio: {INSTALL_HINT}") from None
    return gradio


def main(argv=None):
    from utils import print_user_error, raise_interrupt

    opts = parse_options(argv)
    try:
        gr = import_gradio()
        page = DepthPage(opts)  # a missing, corrupt or unsafe checkpoint stops here, with one line
    except Exception as err:
        return print_user_error(err)
    previous_sigterm = signal.signal(signal.SIGTERM, raise_interrupt)  # stop as on Ctrl-C: the work folder goes too
    try:
        blocks, theme = build_page(page, gr)
        blocks.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
        blocks.launch(server_name=opts.host, server_port=opts.port, max_file_size=f"{opts.max_upload_mb:g}mb",
                      allowed_paths=[page.workdir], theme=theme, css=CSS, footer_links=[], quiet=True,
                      prevent_thread_lock=True)
        print(f"serving {' + '.join(opts.ckpt)} on http://{opts.host}:{opts.port} (Ctrl-C stops)", flush=True)
        blocks.block_thread()  # until Ctrl-C or SIGTERM, which close the server
    except OSError as err:  # Gradio's words for a port in use name its own API: say it with our options
        print(f"error: cannot serve on {opts.host}:{opts.port} ({str(err).split('. ')[0]}); choose another --port "
              "or --host", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        page.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
