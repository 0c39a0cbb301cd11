"""`gmar app`: the page in headless Chromium, its `explain` API against gmar.explain, bad input.

One server (`gmar app`, the reference ViT, a free local port) serves every test here. The browser is
Debian's chromium and chromium-driver, driven by selenium; nothing is downloaded.
"""

import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gmar
from gmar.frontends import app
from gmar.frontends.cli import main
from gmar.preprocess import load_image, preprocess
from tolerance import FLOAT32

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver"
#: how long the server may take to start, and an explanation to arrive, on a busy two-core machine
START_S, WAIT_S = 180, 90
#: the upload limit of the test server, in MB
UPLOAD_MB = 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(folder: Path, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    """``gmar app FLAGS`` in a subprocess with its own temporary directory ``folder/tmp``: the
    process, its URL and its log, once it answers."""
    port = free_port()
    log, tmp = folder / "server.log", folder / "tmp"
    tmp.mkdir()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp)}
    env.pop("GRADIO_TEMP_DIR", None)
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gmar", "app", "--port", str(port), *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"gmar app exited with {process.returncode}:\n{log.read_text()}", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"gmar app did not answer within {START_S} s:\n{log.read_text()}", pytrace=False)
        time.sleep(0.5)
    return process, url, log


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """``gmar app`` in a subprocess: (URL, its temporary directory); stopped (and checked to have
    kept running) afterwards."""
    folder = tmp_path_factory.mktemp("server")
    process, url, log = start_app(folder, "--max-upload-mb", str(UPLOAD_MB))
    yield url, folder / "tmp"
    alive = process.poll() is None
    stop(process)
    assert alive, f"the server died during the tests:\n{log.read_text()}"
    assert f"serving reference at {url.rstrip('/')}" in log.read_text()


@pytest.fixture(scope="module")
def server(started) -> str:
    return started[0]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    """The example files the page offers (test scenes), written as the app writes them."""
    folder = tmp_path_factory.mktemp("scenes")
    served = app.serve_reference(gmar.load_reference_model(), folder, scenes=3)
    return [path for path, _ in served.examples]


@pytest.fixture(scope="module")
def reference():
    return gmar.load_reference_model()


def expected(model, path: Path, methods: list[str], target=None) -> dict[str, gmar.Explanation]:
    """What gmar.explain gives for the file, read and preprocessed as the app reads it."""
    batch = preprocess(load_image(path), gmar.preprocess_config(model))
    return gmar.explain(model, batch, methods, target=target)


def not_an_image(folder: Path) -> Path:
    path = folder / "notes.png"
    path.write_text("these are notes, not a picture\n")
    return path


def huge_image(folder: Path) -> Path:
    """A PNG whose header says 30000 x 30000 pixels (above Pillow's limit) but holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path = folder / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def variance(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64).var())


# --------------------------------------------------------------------------------------------- the browser


def chromium():
    """Headless Chromium through selenium, or a failure that says what to install."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists() and not shutil.which(path)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: install the browser with {INSTALL}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium missing: pip install -e '.[dev]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1800")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_page_explains_an_example_and_shows_a_head(server, scenes, reference, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium()
    try:
        wait = WebDriverWait(driver, WAIT_S)
        driver.get(server)
        thumbnails = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button.thumbnail-item"))
        assert len(thumbnails) == 6

        # bad input first: a text file named .png gives a message on the page
        upload = driver.find_element(By.CSS_SELECTOR, "#image-file input[type=file]")
        upload.send_keys(str(not_an_image(tmp_path)))
        wait.until(lambda d: "notes.png: not a readable image" in d.find_element(By.TAG_NAME, "body").text)
        assert "/tmp" not in driver.find_element(By.TAG_NAME, "body").text  # the file's name, not the server's path
        for close in driver.find_elements(By.CSS_SELECTOR, ".toast-close"):
            close.click()

        # an example: the page offers its top-5 classes and targets the first
        thumbnails[1].click()
        top = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#top-classes input").get_attribute("value"))
        assert "p=" in top
        target = driver.find_element(By.CSS_SELECTOR, "#target input")
        assert target.get_attribute("value") == top.split("[")[1].split("]")[0]

        driver.find_element(By.CSS_SELECTOR, "#explain").click()
        methods = gmar.supported_methods(reference)

        def overlays(d):
            images = d.find_elements(By.CSS_SELECTOR, "#overlays img")
            loaded = [i for i in images if int(i.get_attribute("naturalWidth") or 0) > 0]
            return loaded if len(loaded) == len(methods) else False

        images = wait.until(overlays)
        captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#overlays .caption-label")]
        assert [c.split(":")[0] for c in captions] == methods
        for image in images:  # each overlay is a picture, not a blank
            assert variance(fetch(image.get_attribute("src"))) > 100

        # the head view of the sliders' layer and head (the last layer, head 0) follows the explanation
        caption = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#head-caption").text)
        assert caption.startswith("layer 3, head 0: attention from the readout token; gmar weight")
        first_view = driver.find_element(By.CSS_SELECTOR, "#head-view img").get_attribute("src")
        # the head weights of every method that has them can be shown
        offered = [label.text for label in driver.find_elements(By.CSS_SELECTOR, "#heads-method label")]
        assert offered == [m for m in methods if m in ("gmar", "gmar_gae")]

        # click the cell of layer 1, head 2 in the head-weights picture
        cells = driver.find_element(By.CSS_SELECTOR, "#head-weights img")
        scale_x = cells.size["width"] / int(cells.get_attribute("naturalWidth"))
        scale_y = cells.size["height"] / int(cells.get_attribute("naturalHeight"))
        left, top, right, bottom = app.cell_box(1, 2, (4, 4))
        x = (left + right) / 2 * scale_x - cells.size["width"] / 2
        y = (top + bottom) / 2 * scale_y - cells.size["height"] / 2
        ActionChains(driver).move_to_element_with_offset(cells, round(x), round(y)).click().perform()
        caption = wait.until(
            lambda d: (t := d.find_element(By.CSS_SELECTOR, "#head-caption").text).startswith("layer 1, head 2") and t
        )
        weights = expected(reference, scenes[1], ["gmar"])["gmar"].head_weights[0]
        assert caption.endswith(f"gmar weight {float(weights[1, 2]):.3f}")
        assert driver.find_element(By.CSS_SELECTOR, "#layer input[type=number]").get_attribute("value") == "1"
        assert driver.find_element(By.CSS_SELECTOR, "#head input[type=number]").get_attribute("value") == "2"
        second_view = wait.until(
            lambda d: (
                (src := d.find_element(By.CSS_SELECTOR, "#head-view img").get_attribute("src")) != first_view and src
            )
        )
        assert fetch(second_view) != fetch(first_view)
        assert variance(fetch(second_view)) > 100

        # gmar_gae's weights instead: the picture and the caption follow the picker
        before = driver.find_element(By.CSS_SELECTOR, "#head-weights img").get_attribute("src")
        picker = driver.find_elements(By.CSS_SELECTOR, "#heads-method label")
        next(label for label in picker if label.text == "gmar_gae").click()
        gae = expected(reference, scenes[1], ["gmar_gae"])["gmar_gae"].head_weights[0]
        wait.until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#head-caption").text.endswith(
                f"; gmar_gae weight {float(gae[1, 2]):.3f}"
            )
        )
        assert wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#head-weights img").get_attribute("src") != before)

        # downloads are offered
        assert len(driver.find_elements(By.CSS_SELECTOR, "#maps a")) >= len(methods)
        assert driver.find_elements(By.CSS_SELECTOR, "#figure a")

        screenshot = tmp_path / "app.png"
        driver.save_screenshot(str(screenshot))
        assert variance(screenshot.read_bytes()) > 500, "the screenshot is blank"
        if os.environ.get("GMAR_APP_SCREENSHOT"):  # how docs/app.png is refreshed
            shutil.copy(screenshot, os.environ["GMAR_APP_SCREENSHOT"])

        # offline: the page asked nothing of any host but the server
        requested = set()
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                requested.add(message["params"]["request"]["url"])
        elsewhere = [u for u in requested if not u.startswith((server, "data:", "blob:"))]
        assert not elsewhere, elsewhere
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------ the API endpoint


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def call(connection, path: Path, methods: list[str], target=None, prompts: str = ""):
    from gradio_client import handle_file

    return connection.predict(handle_file(str(path)), methods, target, prompts, api_name="/explain")


def check_maps(result, explanations: dict[str, gmar.Explanation]) -> None:
    gallery, weights, maps, figure, picture = result
    assert [item["caption"].split(":")[0] for item in gallery] == list(explanations)
    assert [Path(m).name for m in maps] == [f"{name}.npy" for name in explanations]
    for path, (name, explanation) in zip(maps, explanations.items(), strict=True):
        np.testing.assert_allclose(np.load(path), explanation.heatmap[0].numpy(), rtol=0, atol=1e-5, err_msg=name)
    heads = [name for name, explanation in explanations.items() if explanation.head_weights is not None]
    if heads:  # every method with head weights, the first one shown
        assert weights["method"] == heads[0] and list(weights["methods"]) == heads
        shown = explanations[heads[0]].head_weights.numpy()
        np.testing.assert_allclose(weights["head_weights"], shown, **FLOAT32)
        for name in heads:
            np.testing.assert_allclose(weights["methods"][name], explanations[name].head_weights.numpy(), **FLOAT32)
    else:
        assert weights is None
    assert Image.open(figure).size[0] > 0 and Path(picture).is_file()


def test_api_explain_equals_gmar_explain(server, scenes, reference):
    connection = client(server)
    assert "/explain" in connection.view_api(return_format="dict", print_info=False)["named_endpoints"]
    methods = gmar.supported_methods(reference)
    check_maps(call(connection, scenes[0], methods), expected(reference, scenes[0], methods))
    # another class than the predicted one, two methods
    check_maps(call(connection, scenes[0], ["gmar", "gae"], 5), expected(reference, scenes[0], ["gmar", "gae"], 5))
    # head weights without gmar: gmar_gae's
    both = ["gmar_gae", "rollout"]
    check_maps(call(connection, scenes[1], both), expected(reference, scenes[1], both))
    check_maps(call(connection, scenes[1], ["rollout"]), expected(reference, scenes[1], ["rollout"]))


def test_concurrent_requests_get_their_own_maps(server, scenes, reference):
    """Two clients at once (two tabs): each gets the maps of its own image and target."""
    methods = ["gmar", "rollout", "legrad", "gradcam"]
    jobs = [(scenes[1], None), (scenes[2], 3), (scenes[1], 2), (scenes[2], None)]
    connections = [client(server), client(server)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: call(connections[i % 2], jobs[i][0], methods, jobs[i][1]), range(len(jobs))))
    for (path, target), result in zip(jobs, results, strict=True):
        check_maps(result, expected(reference, path, methods, target))


def test_bad_input_gives_a_message_and_the_server_keeps_running(server, scenes, reference, tmp_path):
    from gradio_client.exceptions import AppError

    connection = client(server)
    cases = [
        ((scenes[0], ["gmar"]), {"target": 2.5}, "a class is a whole number, not 2.5"),
        ((not_an_image(tmp_path), ["gmar"]), {}, "notes.png: not a readable image"),
        ((huge_image(tmp_path), ["gmar"]), {}, "huge.png: too large: 900000000 pixels, above the page's limit"),
        ((scenes[0], ["gmar"]), {"prompts": "a circle"}, "reference is a classifier: text prompts are for CLIP"),
        ((scenes[0], ["gmar"]), {"target": 6}, "target classes must be in [0, 6)"),
        ((scenes[0], []), {}, "choose at least one method"),
    ]
    for args, options, message in cases:
        with pytest.raises(AppError) as error:
            call(connection, *args, **options)
        assert message in str(error.value)
    check_maps(call(connection, scenes[0], ["gmar"]), expected(reference, scenes[0], ["gmar"]))


# ------------------------------------------------------------------------------------- in process, no server


def test_prompts_explain_a_clip_model_one_row_per_prompt(tmp_path):
    from conftest import clip_tokenizer, make_clip_with_text

    model = make_clip_with_text()
    loaded = gmar.LoadedModel(
        model, gmar.preprocess_config(model), None, "openclip:tiny", {"tokenizer": clip_tokenizer()}
    )
    served = app.serve_loaded(loaded)
    assert not served.is_classifier and served.head_grid == (3, 4)
    path = served.examples[0][0]
    result = app.explain_image(served, path, ["gmar", "rollout"], prompts="a red circle\n\n a stripe \n")
    assert [row.split(" (")[0] for row in result.rows] == ['"a red circle"', '"a stripe"']
    captions = [caption for _, caption in app.overlays(result)]
    assert len(captions) == 4 and captions[0].startswith('gmar: "a red circle"')
    batch = preprocess(load_image(path), served.preprocess)
    target = gmar.TextTarget(model, clip_tokenizer(), ["a red circle", "a stripe"])
    for name, explanation in gmar.explain(model, batch, ["gmar", "rollout"], target=target).items():
        torch.testing.assert_close(result.explanations[name].heatmap, explanation.heatmap)
    maps, figure = app.write_downloads(result, tmp_path / "out")
    assert np.load(maps[0]).shape == (2, *served.preprocess.input_size) and Path(figure).is_file()
    with pytest.raises(gmar.GmarError, match="write at least one prompt"):
        app.explain_image(served, path, ["gmar"])
    with pytest.raises(gmar.GmarError, match="with text prompts, not a class index"):
        app.explain_image(served, path, ["gmar"], target=1, prompts="a circle")


def test_head_view_offers_every_method_with_head_weights(reference, scenes):
    served = app.serve_reference(reference, scenes[0].parent, scenes=1)
    result = app.explain_image(served, scenes[0], ["rollout", "gmar_gae", "gmar"])
    assert app.head_methods(result) == ["gmar_gae", "gmar"]
    library = expected(reference, scenes[0], ["gmar_gae", "gmar"])
    weights = app.head_weights(result)
    assert weights["method"] == "gmar_gae" and list(weights["methods"]) == ["gmar_gae", "gmar"]
    for name in ("gmar_gae", "gmar"):
        np.testing.assert_allclose(weights["methods"][name], library[name].head_weights.numpy(), **FLOAT32)
        _, caption = app.head_view(result, 1, 2, name)
        assert caption.endswith(f"; {name} weight {float(library[name].head_weights[0, 1, 2]):.3f}")
        assert app.head_weights(result, name)["method"] == name
    _, caption = app.head_view(result, 1, 2)  # the first method with head weights
    assert caption.endswith(f"; gmar_gae weight {float(library['gmar_gae'].head_weights[0, 1, 2]):.3f}")
    plain = app.explain_image(served, scenes[0], ["rollout"])
    assert app.head_methods(plain) == [] and app.head_weights(plain) is None
    assert app.head_view(plain, 1, 2)[1] == "layer 1, head 2: attention from the readout token"


def test_labels_and_probabilities_of_a_timm_model_on_the_page():
    """timm's class names reach the page; the top classes are the softmax of the model's logits."""
    loaded = gmar.load_model("timm:test_vit", pretrained=False)
    served = app.serve_loaded(loaded)
    names = gmar.get_adapter(loaded.model).class_names()
    batch = app.model_input(served, load_image(served.examples[0][0]))
    with torch.no_grad():
        probabilities = torch.softmax(loaded.model(batch), dim=-1)[0]
    values, indices = probabilities.topk(app.TOP_K)
    best = app.top_classes(served, batch)
    assert [(i, name) for i, name, _ in best] == [(int(i), f"{names[i]} [{int(i)}]") for i in indices]
    np.testing.assert_allclose([p for _, _, p in best], values.numpy(), **FLOAT32)
    result = app.explain_image(served, served.examples[0][0], ["gmar"], target=281)
    assert result.rows == [f"tabby, tabby cat [281], p={float(probabilities[281]):.2f}"]


def test_head_weights_picture_and_clicks_agree(reference, scenes):
    served = app.serve_reference(reference, scenes[0].parent, scenes=1)
    result = app.explain_image(served, scenes[0], ["gmar", "rollout"])
    weights = result.explanations["gmar"].head_weights[0]
    picture = app.heads_picture(weights, (1, 2), served.head_grid)
    grid = served.head_grid
    for layer in range(4):
        for head in range(4):
            left, top, right, bottom = app.cell_box(layer, head, grid)
            for x, y in ((left, top), (right, bottom), ((left + right) / 2, (top + bottom) / 2)):
                assert app.head_at(x, y, grid) == (layer, head)
    assert app.head_at(app.LEFT - 1, app.TOP + 1, grid) is None
    assert app.head_at(app.cell_box(0, 3, grid)[2] + 1, app.TOP + 1, grid) is None
    assert app.head_at(app.LEFT + 1, app.cell_box(3, 0, grid)[3] + 1, grid) is None
    # the selected cell is outlined in white: its border differs from an unselected picture's
    plain = app.heads_picture(weights, None, grid)
    left, top = app.cell_box(1, 2, grid)[:2]
    assert (
        (picture != plain).any()
        and (picture[top + 1, left + 1] == 255).all()
        and (plain[top + 1, left + 1] != 255).any()
    )
    right, bottom = app.cell_box(11, 11, (12, 12))[2:]
    assert app.heads_picture(None, None, (12, 12)).shape[:2] == (bottom + 3, right + 3)
    assert app.cell_size((12, 12)) < app.cell_size(grid)  # many heads: smaller cells
    # the head view is gmar.head_attention's map for that head, with GMAR's weight
    view, caption = app.head_view(result, 1, 2)
    assert caption.endswith(f"gmar weight {float(weights[1, 2]):.3f}")
    batch = preprocess(load_image(scenes[0]), served.preprocess)
    torch.testing.assert_close(result.head_maps, gmar.head_attention(reference, batch)[0])
    assert view.shape[0] >= app.DISPLAY and not (view == app.head_view(result, 1, 3)[0]).all()


def test_busy_port_is_refused_before_the_model_loads(capsys):
    from conftest import one_error_line

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in one_error_line(capsys)
    assert main(["app", "--port", "70000"]) == 2
    assert "--port must be in [1, 65535]" in one_error_line(capsys)


def test_without_gradio_says_what_to_install(monkeypatch, capsys):
    from conftest import one_error_line

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["app", "--port", str(free_port())]) == 2
    assert one_error_line(capsys) == "gmar: error: gmar app needs gradio: pip install 'gmar[app]'"


def test_command_line_serves_reference_or_any_spec(monkeypatch, capsys):
    """`gmar app` hands app.launch the model it names (the page itself is tested above)."""
    from conftest import one_error_line

    served = []
    monkeypatch.setattr(app, "launch", lambda model, host, port, work=None: served.append((model, host, port)))
    port = free_port()
    assert main(["app", "--port", str(port)]) == 0
    reference, host, given = served.pop()
    assert (reference.spec, host, given, reference.multi_label) == ("reference", "127.0.0.1", port, True)
    assert len(reference.examples) == 6 and reference.head_grid == (4, 4)
    assert main(["app", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--port", str(port)]) == 0
    timm, _, _ = served.pop()
    assert timm.spec == "timm:vit_tiny_patch16_224" and timm.head_grid == (12, 3) and not timm.multi_label
    assert timm.methods == gmar.all_methods()  # occlusion, slow, is asked by name
    result = app.explain_image(timm, timm.examples[0][0], ["gmar", "legrad"], target=7)
    assert int(result.explanations["gmar"].target[0]) == 7 and len(app.overlays(result)) == 2
    best = app.top_classes(timm, app.model_input(timm, app.read_image(timm.examples[0][0])))
    assert len(best) == 5 and sum(p for _, _, p in best) <= 1.0 + 1e-6
    assert main(["app", "--random-init", "--port", str(port)]) == 2
    assert "the reference model is trained" in one_error_line(capsys)


# ----------------------------------------------------------------------------- private files and limits


def run_folder(tmp: Path) -> Path:
    """The one folder the server keeps in its temporary directory."""
    # torch makes an empty torchinductor_USER folder when torch._inductor is imported: it holds no upload
    entries = sorted(e for e in tmp.iterdir() if not e.name.startswith("torchinductor_"))
    assert [e.name.startswith("gmar-app-") for e in entries] == [True], entries
    return entries[0]


def http_status(url: str, data: bytes | None = None, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers or {}), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_served_files_are_private_and_inside_one_run_folder(started, scenes, reference):
    url, tmp = started
    check_maps(call(client(url), scenes[2], ["gmar"]), expected(reference, scenes[2], ["gmar"]))
    run = run_folder(tmp)  # no $TMPDIR/gradio, no gmar-examples-*: gradio's cache and the examples are inside
    assert (run / "gradio").is_dir() and list((run / "gradio").rglob("scene_2.png")), "the upload is not in the cache"
    for path in [run, *run.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}: readable by others"
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} is {oct(mode)}"


def test_downloads_cannot_be_guessed_and_only_served_outputs_are_given(started, scenes):
    from gradio_client import Client, handle_file

    url, tmp = started
    remote = Client(url, verbose=False, download_files=False)
    _, _, maps, figure, _ = remote.predict(handle_file(str(scenes[1])), ["gmar"], None, "", api_name="/explain")
    assert http_status(maps[0]["url"]) == 200 and http_status(figure["url"]) == 200
    assert "/gradio/" in maps[0]["url"]  # served from gradio's cache inside the run folder
    run = run_folder(tmp)
    folders = sorted((run / "downloads").iterdir())
    assert folders and not any(f.name.startswith("request_") for f in folders)
    for folder in folders:  # secrets.token_urlsafe(16): 128 random bits, and not served directly anyway
        assert len(folder.name) >= 22
        assert http_status(f"{url}gradio_api/file={folder}/gmar.npy") == 403
    cache = run / "gradio"
    for refused in (
        f"{run}/downloads/request_1/gmar.npy",
        f"{cache}/../downloads/{folders[0].name}/gmar.npy",
        "/etc/passwd",
        f"{cache}/../../../../etc/passwd",
    ):
        assert http_status(f"{url}gradio_api/file={refused}") in (403, 404), refused


def test_uploads_over_the_limit_are_refused(started):
    url, tmp = started
    boundary = "gmarboundary"

    def upload(size: int) -> int:
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + b"\0" * size
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return http_status(f"{url}gradio_api/upload", body, headers)

    assert upload(UPLOAD_MB * 1024 * 1024 + 1024) == 413
    assert not list(run_folder(tmp).rglob("big.png")), "the refused upload was stored"
    assert upload(1024) == 200


def test_sigterm_removes_every_folder_as_ctrl_c_does(tmp_path, scenes):
    for stopping in (signal.SIGTERM, signal.SIGINT):
        folder = tmp_path / stopping.name
        folder.mkdir()
        process, url, log = start_app(folder)
        try:
            call(client(url), scenes[0], ["gmar"])
            assert list((folder / "tmp").iterdir())
            process.send_signal(stopping)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        left = [e for e in (folder / "tmp").iterdir() if not e.name.startswith("torchinductor_")]
        assert left == [], f"{stopping.name} left {left}"
        assert "Traceback" not in log.read_text(), log.read_text()


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width x height`` but that holds no pixels: decoding it fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_pixels_and_prompts_are_capped_in_one_line(reference, tmp_path):
    from conftest import clip_tokenizer, make_clip_with_text

    served = app.serve_reference(reference, tmp_path, scenes=1)
    assert served.limits == app.Limits() and app.Limits().max_pixels == 40_000_000
    served.limits = app.Limits(max_pixels=1_000_000)
    big = header_only_png(tmp_path / "big.png", 5000, 5000)  # refused on its header: it holds nothing to decode
    with pytest.raises(gmar.GmarError) as error:
        app.explain_image(served, big, ["gmar"])
    assert str(error.value) == (
        "big.png: too large: 5000 x 5000 pixels, above the page's limit of 1000000 (gmar app --max-pixels)"
    )
    model = make_clip_with_text()
    loaded = gmar.LoadedModel(
        model, gmar.preprocess_config(model), None, "openclip:tiny", {"tokenizer": clip_tokenizer()}
    )
    clip = app.serve_loaded(loaded)
    assert clip.limits.max_prompts == 16
    many = "\n".join(f"prompt {i}" for i in range(300))
    start = time.monotonic()
    with pytest.raises(gmar.GmarError) as error:
        app.explain_image(clip, clip.examples[0][0], ["gmar"], prompts=many)
    assert str(error.value) == "300 prompts: the page explains at most 16 at once (gmar app --max-prompts)"
    assert time.monotonic() - start < 1.0
    clip.limits = app.Limits(max_prompts=2)
    assert len(app.explain_image(clip, clip.examples[0][0], ["gmar"], prompts="a\nb").rows) == 2
    with pytest.raises(gmar.GmarError, match="3 prompts: the page explains at most 2"):
        app.explain_image(clip, clip.examples[0][0], ["gmar"], prompts="a\nb\nc")


THIN = """
import resource, sys
from pathlib import Path
import numpy as np
from PIL import Image
import gmar
from gmar.frontends import app
from gmar.preprocess import denormalise

folder = Path(sys.argv[1])
served = app.serve_reference(gmar.load_reference_model(), folder, scenes=1)

def page(path, out):  # what the page does with an upload: preview, explanation, overlays, head view, downloads
    batch = app.model_input(served, app.read_image(path))
    app.enlarged(denormalise(batch, served.preprocess)[0].permute(1, 2, 0).numpy())
    result = app.explain_image(served, path, ["gmar", "rollout"])
    app.overlays(result)
    app.head_view(result, 1, 2)
    app.write_downloads(result, folder / out)

page(served.examples[0][0], "warm")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for width in (30000, 100000):
    path = folder / f"thin_{width}.png"
    Image.new("RGB", (width, 1), (200, 30, 30)).save(path)
    page(path, f"out_{width}")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after)
"""


def test_thin_uploads_allocate_nothing_proportional_to_their_enlargement(tmp_path):
    """A 30000 x 1 and a 100000 x 1 image through the page's whole path: its peak memory hardly moves."""
    done = subprocess.run(
        [sys.executable, "-c", THIN, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    before, after = (int(v) for v in done.stdout.split())
    assert after - before < 100 * 1024, f"peak memory grew by {(after - before) / 1024:.0f} MB"
    thin = app.enlarged(np.zeros((1, 100000, 3)))
    assert thin.shape[0] * thin.shape[1] <= 100000 * 4, thin.shape  # enlarged by a factor the long side allows


def test_limits_are_flags_checked_before_the_model_loads(monkeypatch, capsys):
    from conftest import one_error_line

    served = []
    monkeypatch.setattr(app, "launch", lambda model, host, port, work=None: served.append(model))
    port = str(free_port())
    flags = ["--max-upload-mb", "5", "--max-pixels", "1000000", "--max-prompts", "3"]
    assert main(["app", "--port", port, *flags]) == 0
    assert served.pop().limits == app.Limits(max_upload_mb=5, max_pixels=1_000_000, max_prompts=3)
    for flag in ("--max-upload-mb", "--max-pixels", "--max-prompts"):
        assert main(["app", "--port", port, flag, "0"]) == 2
        assert f"{flag} must be at least 1, not 0" in one_error_line(capsys)
    assert main(["app", "--port", port, "--max-pixels", "1000000000"]) == 2
    assert "--max-pixels must be at most Pillow's limit" in one_error_line(capsys)
    assert not served


def test_an_invalid_host_is_named_not_the_port(capsys):
    from conftest import one_error_line

    assert main(["app", "--host", "127.0.0.999", "--port", str(free_port())]) == 2
    line = one_error_line(capsys)
    assert "--host 127.0.0.999 is not an address" in line and "--port" not in line


def test_private_folder_and_sigterm_handler_leave_the_process_as_they_found_it(monkeypatch):
    umask = os.umask(0o022)
    try:
        monkeypatch.setenv("GRADIO_TEMP_DIR", "/somewhere/else")
        with app.private_folder() as folder:
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert os.environ["GRADIO_TEMP_DIR"] == str(folder / "gradio")
            (folder / "file").write_text("x")
            assert stat.S_IMODE((folder / "file").stat().st_mode) == 0o600
        assert not folder.exists() and os.environ["GRADIO_TEMP_DIR"] == "/somewhere/else"
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(umask)
    handler = signal.getsignal(signal.SIGTERM)
    seen = []
    monkeypatch.setattr(app, "launch", lambda *a, **k: seen.append(signal.getsignal(signal.SIGTERM)))
    assert main(["app", "--port", str(free_port())]) == 0
    assert seen and seen[0] is not handler and signal.getsignal(signal.SIGTERM) is handler
