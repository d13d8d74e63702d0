"""A web page to try a trained model: python app.py --ckpt runs/demo/best.pt, then open http://127.0.0.1:7860.

Optional: needs Gradio (pip install -r requirements-app.txt). Upload or drop a photo (any
size; JPEG, PNG or whatever Pillow reads; RGB, RGBA or grayscale) or pick an example scene
made by synthetic.py, and the page shows:
  - the depth, colourised at the photo's own size on the fixed [0, 20] m scale of
    --predict's PNGs, with its colour bar in metres, a min / median / max readout, and
    the depth of any point you click;
  - a 3-D point cloud back-projected as --predict --ply does, with the field of view as a slider;
  - downloads: NAME.npy (metres), NAME_mm.png (16-bit millimetres) and NAME.ply, the very
    files --predict writes for the same photo.
The model is loaded once, at start-up, with the weights_only loading of every checkpoint
here; requests go through one queue that runs one at a time, as the model has one device.
A file that is not a readable image gets a message in the page, and the server goes on.
"""
import os
import shutil
import sys
import tempfile
import time

import numpy as np

# Gradio reports usage to its authors unless told not to; the page works offline and reports nothing.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

INSTALL_HINT = "pip install -r requirements-app.txt"
MAX_DEPTH = 20.0  # the scale of the model's training targets and of every depth picture here
VIEWER_POINTS = 250_000  # a larger photo's 3-D view is drawn from every k-th pixel; its .ply download has them all
EXAMPLES = (("street", 3), ("street", 11), ("yard", 5))  # (style, seed) of the example scenes
EXAMPLE_SIZE = (288, 512)  # twice the data set's 144 × 256: the page is not tied to the training size
CSS = """
#colourbar .bar {height: 14px; border-radius: 3px}
#colourbar .ticks {display: flex; justify-content: space-between; font-size: 12px}
"""


class DepthPage:
    """The model behind the page, and what each request computes with it."""

    def __init__(self, opts):
        from main import load_for_inference

        self.opts = opts
        self.model, self.size, self.device, self.amp_dtype = load_for_inference(opts)
        # The examples, and one folder per request, live here until the server stops.
        self.workdir = tempfile.mkdtemp(prefix="depth-app-")
        self.requests = os.path.join(self.workdir, "requests")
        os.makedirs(self.requests)

    def close(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def predict(self, rgb):
        """Depth in metres of one HWC uint8 image, at its own size: --predict's computation for a batch of one."""
        from dataset import to_model_input
        from predict import predict_depth

        inputs = to_model_input(rgb, self.size)[None].to(self.device)
        return predict_depth(self.model, inputs, [rgb.shape[:2]], self.amp_dtype, MAX_DEPTH)[0]

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


def point_cloud_for_viewer(folder, stem, rgb, depth, fov, full_ply):
    """The .ply the 3-D view shows: the download itself, or every k-th pixel's point for a large photo."""
    from predict import write_ply

    step = int(np.ceil(np.sqrt(depth.size / VIEWER_POINTS)))
    if step == 1:
        return full_ply
    path = os.path.join(folder, f"{stem}_view.ply")
    write_ply(path, np.ascontiguousarray(rgb[::step, ::step]), np.ascontiguousarray(depth[::step, ::step]), fov)
    return path


def readout(depth, seconds, point=None):
    """Markdown: the depth's size, min / median / max, and the depth at a clicked point."""
    text = (f"**{depth.shape[1]} × {depth.shape[0]}** pixels, predicted in {seconds * 1000:.0f} ms. "
            f"Depth min **{depth.min():.2f} m**, median **{np.median(depth):.2f} m**, max **{depth.max():.2f} m**.")
    if point is not None:
        x, y = point
        text += f"  \nAt the clicked point (x {x}, y {y}): **{depth[y, x]:.2f} m**."
    else:
        text += "  \nClick the depth picture to read the depth at a point."
    return text


def colour_bar_html(cmap, max_depth=MAX_DEPTH, ticks=5):
    """The colour bar of the depth picture as HTML: a CSS gradient through the colormap, ticks in metres."""
    from utils import colorize_depth

    stops = colorize_depth(np.linspace(0.0, max_depth, 33)[None], 0.0, max_depth, cmap)[0]
    gradient = ", ".join(f"rgb({r},{g},{b})" for r, g, b in stops)
    labels = "".join(f"<span>{v:g}</span>" for v in np.linspace(0.0, max_depth, ticks))
    return (f'<div class="bar" style="background: linear-gradient(to right, {gradient})"></div>'
            f'<div class="ticks">{labels}</div><div style="text-align:center;font-size:12px">depth (m)</div>')


def build_page(page, gr):
    """The Gradio Blocks of the page, wired to `page` (a DepthPage)."""
    from dataset import DataError, read_rgb
    from predict import output_paths, write_outputs

    opts = page.opts
from gradio.events import Dependency

    class PhotoInput(gr.Image):
        """gr.Image that passes the uploaded file on untouched, readable or not: reading it and saying
        what is wrong is read_rgb's job (gr.Image would fail first, with a generic message)."""

        def preprocess(self, payload):
            return None if payload is None else payload.path

        def get_block_name(self):
            return "image"  # the front end of gr.Image

    def on_photo(path, fov):
        """A new photo (or none): depth picture, readout, 3-D view, downloads, and the state for later events."""
        if path is None:
            return None, "", None, None, None
        name = os.path.basename(path)
        try:
            rgb = read_rgb(path)
        except DataError as err:
            reason = str(err).replace(path, name).split(": ", 1)[-1].removesuffix(" Re-export or remove the file.")
            return None, f"**Could not read {name}**: it is not an image this page can read ({reason}).", None, None, None
        start = time.perf_counter()
        depth = page.predict(rgb)
        seconds = time.perf_counter() - start
        folder = page.request_folder()
        files = output_paths(name, folder, png16=True, ply=True)
        write_outputs(files, depth, rgb, MAX_DEPTH, opts.cmap, fov)
        state = {"rgb": rgb, "depth": depth, "stem": os.path.splitext(name)[0], "folder": folder,
                 "files": files, "seconds": seconds}
        view = point_cloud_for_viewer(folder, state["stem"], rgb, depth, fov, files["ply"])
        return (files["png"], readout(depth, seconds), view, [files["npy"], files["png16"], files["ply"]], state)

    def on_fov(state, fov):
        """The field of view changed: the point cloud again (download and view)."""
        if state is None:
            return None, None
        from predict import write_ply

        files = state["files"]
        write_ply(files["ply"], state["rgb"], state["depth"], fov)
        view = point_cloud_for_viewer(state["folder"], state["stem"], state["rgb"], state["depth"], fov, files["ply"])
        return view, [files["npy"], files["png16"], files["ply"]]

    def on_click(state, evt: gr.SelectData):
        if state is None:
            return ""
        return readout(state["depth"], state["seconds"], point=tuple(int(v) for v in evt.index))

    example_paths = page.make_examples()
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    with gr.Blocks(title="Monocular depth", delete_cache=(600, 3600)) as blocks:
        gr.Markdown(f"## Monocular depth: ResNet-34 encoder, transposed-convolution decoder\n"
                    f"Checkpoint `{os.path.basename(opts.ckpt)}`, input {page.size} × {page.size}, on {page.device}. "
                    f"Upload or drop a photo (JPEG or PNG, any size, at most {opts.max_upload_mb:g} MB), or pick an example.")
        state = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column():
                photo = PhotoInput(label="photo", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                   elem_id="photo")
                gr.Examples([[p] for p in example_paths], inputs=photo, label="examples: synthetic scenes")
            with gr.Column():
                depth = gr.Image(label="depth, at the photo's size", type="filepath", format="png", interactive=False,
                                 elem_id="depth")
                gr.HTML(colour_bar_html(opts.cmap), elem_id="colourbar")
                info = gr.Markdown("", elem_id="readout")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                cloud = gr.Model3D(label="3-D point cloud (drag to turn, scroll to zoom)", display_mode="point_cloud",
                                   clear_color=(0.1, 0.1, 0.12, 1.0), height=420, elem_id="cloud")
                fov = gr.Slider(10, 170, value=opts.fov, step=1, label="horizontal field of view of the camera (degrees)",
                                elem_id="fov")
            with gr.Column(scale=1):
                files = gr.File(label="downloads: depth in metres (.npy), in millimetres (16-bit PNG), point cloud (.ply)",
                                file_count="multiple", interactive=False, elem_id="downloads")
        # One concurrency group for every event that runs the model: one request at a time on its device.
        photo.change(on_photo, [photo, fov], [depth, info, cloud, files, state], concurrency_id="model")
        fov.release(on_fov, [state, fov], [cloud, files], concurrency_id="model")
        depth.select(on_click, [state], [info], concurrency_id="model")
    return blocks, theme


def main(argv=None):
    from main import parse_app_options, user_error_message

    opts = parse_app_options(argv)
    try:
        import gradio as gr
    except ImportError:
        print(f"error: app.py needs Gradio: {INSTALL_HINT}", file=sys.stderr)
        return 1
    try:
        page = DepthPage(opts)  # a missing, corrupt or unsafe checkpoint stops here, with one line
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    try:
        blocks, theme = build_page(page, gr)
        blocks.queue(default_concurrency_limit=1, max_size=32)
        print(f"serving {opts.ckpt} on http://{opts.host}:{opts.port} (Ctrl-C stops)", flush=True)
        blocks.launch(server_name=opts.host, server_port=opts.port, max_file_size=f"{opts.max_upload_mb:g}mb",
                      allowed_paths=[page.workdir], theme=theme, css=CSS, footer_links=[], quiet=True)
    except OSError as err:  # the port is taken
        print(f"error: cannot serve on {opts.host}:{opts.port}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())