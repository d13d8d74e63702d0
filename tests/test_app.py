"""app.py, the web page: its options, its start-up errors, its handlers, and the page itself in headless Chromium.

The browser test needs Debian's chromium and chromium-driver and the app's requirements
(.ci/run installs them); it skips, saying which is missing, only where they are absent.
Its code path also makes the README's screenshot:
    python tests/test_app.py --ckpt runs/demo/best.pt --image docs/img/predict/7.jpeg --screenshot docs/img/app.png
"""
import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import app  # noqa: E402  (Gradio is imported by app.main and build_page, not here)
from conftest import make_pair, save_random_checkpoint  # noqa: E402
from main import build_parser, main  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")
CLOUD_BACKGROUND = tuple(round(255 * c) for c in app.VIEW_BACKGROUND[:3])
WAIT_S = 120  # generous: the page waits for the model on a shared 2-core machine


def write_photo(path, size=(131, 97), mode="RGBA", seed=0):
    """A structured photo (a ramp and a block, so depth varies) of an odd size, saved as PNG or JPEG."""
    w, h = size
    rng = np.random.default_rng(seed)
    rgb = np.zeros((h, w, 3), np.float32)
    rgb[:] = np.linspace(40, 220, h, dtype=np.float32)[:, None, None]
    rgb[h // 3: 2 * h // 3, w // 4: w // 2] = rng.uniform(0, 255, 3)
    image = Image.fromarray(np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)).convert(mode)
    image.save(path)
    return path


def predict_reference(ckpt, image, out, fov=90.0):
    """--predict's files for `image` (the reference the page must match); {kind: path}."""
    assert main(["--predict", str(image), "--ckpt", str(ckpt), "--out", str(out), "--png16", "--ply",
                 "--fov", str(fov), "--workers", "0", "--quiet"]) == 0
    stem = os.path.join(out, os.path.splitext(os.path.basename(image))[0])
    return {"npy": stem + ".npy", "png": stem + ".png", "png16": stem + "_mm.png", "ply": stem + ".ply"}


def ply_header(path):
    with open(path, "rb") as f:
        return f.read(400).split(b"end_header")[0].decode("ascii")


# ------------------------------------------------------------------ options and start-up (no browser)
def test_app_options_default_to_localhost_and_share_predicts_definitions():
    opts = app.parse_options(["--ckpt", "x.pt"])
    assert (opts.host, opts.port, opts.max_upload_mb) == ("127.0.0.1", 7860, 20.0)
    assert opts.image_size is None  # the checkpoint's own size, as for --predict
    ours = {a.dest: a for a in build_parser()._actions}
    shared = [a for a in app.build_parser()._actions
              if a.dest in ("ckpt", "device", "amp", "cmap", "fov", "image_size", "flip", "max_pixels")]
    assert len(shared) == 8 and not opts.flip
    for action in shared:
        assert (action.option_strings, action.choices, action.nargs) == \
            (ours[action.dest].option_strings, ours[action.dest].choices, ours[action.dest].nargs)
        assert "--eval" not in action.help and "--predict" not in action.help, "the page's own words"
    assert next(a for a in shared if a.dest == "ckpt").required


@pytest.mark.parametrize("argv, message", [([], "the following arguments are required: --ckpt"),
                                           (["--ckpt", "x", "--port", "0"], "--port"),
                                           (["--ckpt", "x", "--fov", "180"], "--fov"),
                                           (["--ckpt", "x", "--max-upload-mb", "0"], "--max-upload-mb")])
def test_app_option_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        app.parse_options(argv)
    assert message in capsys.readouterr().err


class NotATensor:
    pass


def test_app_refuses_a_missing_or_unsafe_checkpoint_in_one_line(tmp_path, capsys):
    pytest.importorskip("gradio")
    assert app.main(["--ckpt", str(tmp_path / "missing.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "not found" in err and err.count("\n") == 1
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "payload": NotATensor()}, unsafe)
    assert app.main(["--ckpt", str(unsafe)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: refused to load {unsafe}") and err.count("\n") == 1


def test_app_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail
    assert app.main(["--ckpt", "x.pt"]) == 1
    assert capsys.readouterr().err == "error: app.py needs Gradio: pip install -r requirements-app.txt\n"


def test_app_on_a_port_in_use_is_a_one_line_error(tiny_checkpoint, capsys):
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app.main(["--ckpt", str(tiny_checkpoint), "--port", str(port), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot serve on 127.0.0.1:{port}") and "--port" in err and err.count("\n") == 1


# ------------------------------------------------------------------ the handlers, called as Gradio calls them
@pytest.fixture(scope="module")
def page(tiny_checkpoint):
    page = app.DepthPage(app.parse_options(["--ckpt", str(tiny_checkpoint), "--device", "cpu"]))
    yield page
    page.close()
    assert not os.path.exists(page.workdir)


def test_page_writes_what_predict_writes(page, tiny_checkpoint, tmp_path):
    photo = write_photo(tmp_path / "photo.png")
    picture, text, view, downloads, state = page.on_photo(str(photo), 70.0)
    reference = predict_reference(tiny_checkpoint, photo, tmp_path / "ref", fov=70.0)
    assert [os.path.basename(p) for p in downloads] == ["photo.npy", "photo_mm.png", "photo.ply"]
    depth = np.load(reference["npy"])
    np.testing.assert_array_equal(np.load(downloads[0]), depth)
    for mine, theirs in ((picture, reference["png"]), (downloads[1], reference["png16"])):
        with Image.open(mine) as a, Image.open(theirs) as b:
            assert a.size == (131, 97) and a.mode == b.mode
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with open(downloads[2], "rb") as a, open(reference["ply"], "rb") as b:
        assert a.read() == b.read()
    assert view == downloads[2]  # a small photo's 3-D view is the download itself
    assert f"min **{depth.min():.2f} m**, median **{np.median(depth):.2f} m**, max **{depth.max():.2f} m**" in text

    view, downloads = page.on_fov(state, 40.0)
    assert "field of view 40 degrees" in ply_header(downloads[2]) and view == downloads[2]
    assert f"(x 7, y 3): **{depth[3, 7]:.2f} m**" in page.on_click(state, (7, 3))


def test_page_with_flip_shows_the_depth_predict_flip_writes(tiny_checkpoint, tmp_path):
    photo = write_photo(tmp_path / "photo.png")
    page = app.DepthPage(app.parse_options(["--ckpt", str(tiny_checkpoint), "--device", "cpu", "--flip"]))
    try:
        downloads = page.on_photo(str(photo), 90.0)[3]
        flipped = np.load(downloads[0])
    finally:
        page.close()
    assert main(["--predict", str(photo), "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "ref"),
                 "--workers", "0", "--quiet", "--flip"]) == 0
    np.testing.assert_array_equal(flipped, np.load(tmp_path / "ref" / "photo.npy"))
    unflipped = np.load(predict_reference(tiny_checkpoint, photo, tmp_path / "plain")["npy"])
    assert np.abs(flipped - unflipped).max() > 1e-3  # --flip reached the model: the photo is not symmetric


def test_page_with_two_checkpoints_shows_what_predict_with_both_writes(tmp_path):
    a, b = (save_random_checkpoint(tmp_path / f"{name}.pt", seed=seed) for name, seed in (("a", 1), ("b", 2)))
    photo = write_photo(tmp_path / "photo.png")
    page = app.DepthPage(app.parse_options(["--ckpt", str(a), str(b), "--device", "cpu"]))
    try:
        shown = np.load(page.on_photo(str(photo), 90.0)[3][0])
    finally:
        page.close()
    assert main(["--predict", str(photo), "--ckpt", str(a), str(b), "--out", str(tmp_path / "both"),
                 "--workers", "0", "--quiet"]) == 0
    np.testing.assert_array_equal(shown, np.load(tmp_path / "both" / "photo.npy"))
    alone = np.load(predict_reference(a, photo, tmp_path / "a")["npy"])
    assert np.abs(shown - alone).max() > 1e-3  # the second checkpoint reached the page's model
    assert app.checkpoints_named([str(a), str(b)]) == "Checkpoints `a.pt`, `b.pt` (their depth averaged)"


def test_page_shows_a_large_photo_as_a_thinner_cloud(page, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "VIEWER_POINTS", 1000)
    _, _, view, downloads, _ = page.on_photo(str(write_photo(tmp_path / "big.jpeg", size=(120, 90), mode="RGB")), 90.0)
    assert "element vertex 10800" in ply_header(downloads[2])  # the download keeps every pixel
    # k = ceil(sqrt(10800 / 1000)) = 4: every 4th pixel of every 4th row, 30 of 120 columns, 23 of 90 rows
    assert "element vertex 690" in ply_header(view)


@pytest.mark.parametrize("content, reason", [(b"\x89PNG\r\n\x1a\n this is not an image", "not a JPEG or PNG file"),
                                             (b"GIF89a" + bytes(20), "not a JPEG or PNG file")])
def test_page_explains_a_file_it_cannot_read(page, tmp_path, content, reason):
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    picture, text, view, downloads, state = page.on_photo(str(bad), 90.0)
    assert (picture, view, downloads, state) == (None, None, None, None)
    assert text.startswith("**Could not read broken.png**:") and reason in text and str(tmp_path) not in text


# ------------------------------------------------------------------ the page in a real browser
def find_browser():
    """(chromium, chromedriver) paths, or skip saying what is missing."""
    pytest.importorskip("gradio",
                        reason="the app's requirements are not installed: pip install -r requirements-app.txt")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -r requirements-dev.txt")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no Chromium and ChromeDriver: apt-get install chromium chromium-driver")
    return chromium, driver


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(ckpt, tmpdir, *extra):
    """app.py on a free local port, its temporary files in `tmpdir`; yields its URL, stops it with SIGTERM."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(os.path.join(tmpdir, "app.log"), "w+")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "app.py"), "--ckpt", str(ckpt), "--port", str(port),
                             "--device", "cpu", *extra], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert proc.poll() is None, f"app.py exited with {proc.returncode}: {open(log.name).read()}"
            assert time.monotonic() < deadline, f"app.py did not answer: {open(log.name).read()}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@contextlib.contextmanager
def chromium(browser, driver_path, download_dir, window=(1280, 1200)):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + (f"--window-size={window[0]},{window[1]}",):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, what):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: condition(d),
                                                                   message=f"waiting for {what}")


def upload(driver, path):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(os.path.abspath(path))


def readout(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "readout").text


def show_depth(driver, url, image):
    """Open the page, upload `image`, wait for its depth picture (at the image's size) and the 3-D view;
    returns the depth picture's <img>."""
    from selenium.webdriver.common.by import By

    if driver.current_url != url:
        driver.get(url)
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"), "the upload box")
    with Image.open(image) as im:
        size = list(im.size)
    upload(driver, image)

    def depth_picture(d):
        for img in d.find_elements(By.CSS_SELECTOR, "#depth img"):
            natural = d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
            expected_name = os.path.splitext(os.path.basename(image))[0] + ".png"
            if natural == size and img.get_attribute("src").endswith(expected_name):
                return img
        return None

    img = wait(driver, depth_picture, f"a depth picture of {size[0]} x {size[1]}")
    wait(driver, cloud_drawn, "the 3-D view to draw the point cloud")
    return img


def cloud_drawn(driver):
    """Whether the 3-D view's canvas shows points: over 3 % of its pixels away from the viewer's background
    colour, below the label and buttons drawn over its top."""
    from selenium.webdriver.common.by import By

    canvases = driver.find_elements(By.CSS_SELECTOR, "#cloud canvas")
    if not canvases or not canvases[0].size["width"]:
        return False
    with Image.open(io.BytesIO(canvases[0].screenshot_as_png)) as shot:
        pixels = np.asarray(shot.convert("RGB"), dtype=np.int16)[40:]
    return (np.abs(pixels - np.array(CLOUD_BACKGROUND)).sum(axis=-1) > 20).mean() > 0.03


def download(driver, name, folder):
    """Click the page's download link of file `name`; the path of the file once the browser has written it."""
    from selenium.webdriver.common.by import By

    link = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#downloads a[download='{name}']"),
                f"a link to {name}")
    link[0].click()
    path = os.path.join(folder, name)
    wait(driver, lambda d: os.path.exists(path) and not os.path.exists(path + ".crdownload"), f"{name} downloaded")
    return path


@pytest.mark.slow
def test_page_in_a_real_browser(tiny_checkpoint, tmp_path):
    browser, driver_path = find_browser()
    from selenium.webdriver.common.by import By

    photo = write_photo(tmp_path / "photo.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    too_big = tmp_path / "too_big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(too_big)
    assert too_big.stat().st_size > 1_000_000
    reference = predict_reference(tiny_checkpoint, photo, tmp_path / "ref")
    app_tmp, downloads = tmp_path / "app_tmp", tmp_path / "downloads"
    app_tmp.mkdir()
    downloads.mkdir()

    with serving(tiny_checkpoint, app_tmp, "--max-upload-mb", "1") as (url, proc), \
            chromium(browser, driver_path, downloads) as driver:
        img = show_depth(driver, url, photo)
        depth = np.load(reference["npy"])
        assert f"min {depth.min():.2f} m, median {np.median(depth):.2f} m, max {depth.max():.2f} m" in readout(driver)
        # What the browser shows and downloads is what --predict writes for the same file.
        with urllib.request.urlopen(img.get_attribute("src")) as response, Image.open(reference["png"]) as png:
            np.testing.assert_array_equal(np.asarray(Image.open(response)), np.asarray(png))
        np.testing.assert_array_equal(np.load(download(driver, "photo.npy", downloads)), depth)
        img.click()  # at its centre: the readout adds the depth of the pixel there
        wait(driver, lambda d: "At the clicked point" in readout(d), "the depth at the clicked point")
        x, y = map(int, re.search(r"\(x (\d+), y (\d+)\)", readout(driver)).groups())
        assert abs(x - 131 // 2) <= 2 and abs(y - 97 // 2) <= 2, (x, y)
        assert f"**{depth[y, x]:.2f} m**".replace("**", "") in readout(driver)
        driver.save_screenshot(str(tmp_path / "page.png"))

        upload(driver, broken)
        wait(driver, lambda d: "Could not read broken.png" in readout(d), "the message about broken.png")
        assert "not a JPEG or PNG file" in readout(driver)
        assert not driver.find_elements(By.CSS_SELECTOR, "#downloads a[download]")  # the old results are cleared
        driver.save_screenshot(str(tmp_path / "page_broken.png"))

        upload(driver, too_big)
        wait(driver, lambda d: "exceed the maximum allowed size" in d.find_element(By.TAG_NAME, "body").text,
             "the upload limit's message")

        show_depth(driver, url, photo)  # the server goes on serving
        assert proc.poll() is None
    assert proc.returncode == 0
    assert not [n for n in os.listdir(app_tmp) if n.startswith("depth-app-")]  # its work folder went with it
    with Image.open(tmp_path / "page.png") as shot:
        assert shot.size[0] == 1280 and np.asarray(shot.convert("L")).std() > 10  # a page, not a blank


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Screenshot the page showing the depth of one image, as the browser "
                                                 "test does.")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--screenshot", required=True, help="PNG to write")
    parser.add_argument("--window", type=int, nargs=2, default=(1280, 1200), metavar=("W", "H"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, serving(args.ckpt, tmp) as (url, _), \
            chromium(*find_browser(), tmp, window=args.window) as driver:
        show_depth(driver, url, args.image)
        time.sleep(2)  # let the 3-D viewer finish drawing
        driver.save_screenshot(args.screenshot)
    print(f"screenshot written to {args.screenshot}")


# ------------------------------------------------------------------ the page under load
SERVER_MEMORY_BOUND = 2.0e9  # bytes of peak resident memory of the page's process: the largest image allowed, with room


def peak_resident_bytes(pid):
    """The process's peak resident memory (VmHWM, Linux) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


@pytest.mark.slow
def test_the_page_under_load(tiny_checkpoint, tmp_path):
    """32 photos at once and 3 bad files, from 35 clients on loopback: every photo gets its depth, every bad
    file its message, and the server is still up, its peak resident memory within SERVER_MEMORY_BOUND
    (measured: 1.24 GB with this test's model, on 2 CPU cores; the model and torch are most of it)."""
    pytest.importorskip("gradio",
                        reason="the app's requirements are not installed: pip install -r requirements-app.txt")
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    photos = []
    for i in range(32):
        rgb, _ = make_pair(np.random.default_rng(i), (60 + i, 90))
        photos.append(tmp_path / f"photo{i}.png")
        Image.fromarray(rgb).save(photos[-1])
    bad = {"text.png": b"not a picture", "empty.jpg": b"", "header.png": b"\x89PNG\r\n\x1a\n" + bytes(30)}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    with serving(tiny_checkpoint, tmp_path) as (url, proc):
        client = Client(url, verbose=False)

        def send(path):
            return client.predict(handle_file(str(path)), 90.0, api_name="/on_photo")

        with ThreadPoolExecutor(len(photos) + len(bad)) as pool:
            results = list(pool.map(send, photos + [tmp_path / n for n in bad], timeout=WAIT_S * 4))
        for i, (picture, text, _, downloads) in enumerate(results[:len(photos)]):
            assert f"**90 × {60 + i}** pixels" in text and os.path.isfile(picture) and len(downloads) == 3
        for name, (picture, text, view, downloads) in zip(bad, results[len(photos):]):
            assert picture is None and view is None and not downloads and f"Could not read {name}" in text
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
        assert proc.poll() is None
        assert peak_resident_bytes(proc.pid) < SERVER_MEMORY_BOUND
