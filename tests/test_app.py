"""The web app end to end in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) against
`punkdiff ui`'s page served on 127.0.0.1, with a small punk model trained at the start of the module on a slice of
the CryptoPunks mirror (120 punks with their type and accessories, a data root of its own).

Generate, the punk builder and the digit picker of two tiny conditional models (a punk attribute model and a digit
model that is a distilled 4-step student), inpaint with a painted mask, a bad path refused in the page, a training
run started, watched, stopped and its checkpoint listed, and an evaluation driven to its report: its reference
proposed from the model's own training data, bad input refused, the report's numbers those of its metrics.json and
its figures shown.
Screenshots go to `test-artifacts/browser/` (or `$PUNKDIFF_TEST_ARTIFACTS`).
Skipped, with the reason, where Chromium, Playwright or Gradio is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

pytest.importorskip("gradio", reason="the web app needs Gradio: pip install 'punkdiff[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright (in punkdiff[dev])")
CHROMIUM = os.environ.get("PUNKDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium executable: install Debian's `chromium` package (apt-get install chromium) or set "
                "PUNKDIFF_CHROMIUM; nothing downloads a browser build here", allow_module_level=True)

from diffusers import DDPMScheduler  # noqa: E402
from tiny_models import PUNK_ACCESSORIES, PUNK_TYPES, digit_pipeline, punk_pipeline  # noqa: E402

from punkdiff.cli import main as punkdiff  # noqa: E402
from punkdiff.eval_runs import eval_available  # noqa: E402
from punkdiff.hub import export_pipeline  # noqa: E402
from punkdiff.jobs import Job  # noqa: E402
from punkdiff.roots import Roots  # noqa: E402

ARTIFACTS = Path(os.environ.get("PUNKDIFF_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
# a UNet small enough to train in seconds on a CPU core: two levels, no attention, T = 100
TINY = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.layers_per_block=1",
        "model.attention_resolutions=[]", "model.mid_attention=false", "train.num_sample_images=4",
        "train.sample_inference_steps=3"]
LONG = 180_000  # ms: a training process starts torch and decodes its slice of data on a shared CPU


def _overrides(items: list[str]) -> list[str]:
    return [flag for item in items for flag in ("--set", item)]


@pytest.fixture(scope="module")
def roots(tmp_path_factory, punks_dir, mnist_dir) -> Roots:
    """A run root holding a punk model trained here (6 steps: its pictures are noise, but real ones), on a slice of
    the punks small enough for its evaluation to train its attribute classifier in seconds."""
    import datasets

    base = tmp_path_factory.mktemp("app")
    punks = base / "data" / "punks-120"
    datasets.load_dataset(str(punks_dir), split="train").select(range(120)).to_parquet(
        punks / "data" / "train-00000-of-00001.parquet")
    (base / "data" / "empty").mkdir()  # a dataset that fails to load
    code = punkdiff([
        "train", "--preset", "punks-24", "--dataset", str(punks), "--max-steps", "6", "--batch-size", "8",
        "--max-train-samples", "32", "--lr-warmup-steps", "0", "--checkpoint-every", "6", "--sample-every", "6",
        "--output-dir", str(base / "runs" / "punks-tiny"), "--cache-dir", str(base / "cache"),
        *_overrides([*TINY, "scheduler.num_train_timesteps=100"]),
    ])
    assert code == 0
    assert punks_dir.parent == mnist_dir.parent
    # two conditional models, named to sort after the trained one (the page opens on the first)
    digits, punks = digit_pipeline(), punk_pipeline()
    export_pipeline(digits.unet, DDPMScheduler(num_train_timesteps=100), base / "runs" / "tiny-digits" / "pipeline",
                    condition=digits.condition,
                    sampling={"sampler": "ddim-trailing", "num_inference_steps": 4, "eta": 0.0, "distilled_steps": 4})
    export_pipeline(punks.unet, DDPMScheduler(num_train_timesteps=100), base / "runs" / "tiny-punks" / "pipeline",
                    condition=punks.condition, attribute_encoder=punks.attribute_encoder)
    return Roots(data=[punks_dir.parent, base / "data"], runs=base / "runs")


@pytest.fixture(scope="module")
def server(roots):
    """`punkdiff ui` in its own process, as a person starts it (default host: 127.0.0.1; Gradio picks a free port
    itself, so no other process can take it between a choice here and the server's bind), started in a working
    directory and with a temporary folder (TMPDIR) that do not hold the run root: Gradio serves only those two
    unless told, so every file the page shows proves the app passed its run root on."""
    log_path = roots.runs.parent / "ui.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed at teardown)
    elsewhere = roots.runs.parent / "elsewhere"
    (elsewhere / "tmp").mkdir(parents=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "punkdiff.cli", "ui", *[f"--data-root={p}" for p in roots.of("data")],
         "--run-root", str(roots.runs)],
        stdout=log, stderr=subprocess.STDOUT, cwd=elsewhere,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(elsewhere / "tmp")},
    )
    deadline = time.time() + 120
    while not (match := re.search(r"Running on local URL:\s+(http://127\.0\.0\.1:\d+)", log_path.read_text())):
        assert server.poll() is None, log_path.read_text()
        assert time.time() < deadline, "punkdiff ui did not open its port in 120 s"
        time.sleep(0.5)
    server.url = match.group(1)
    server.log_path = log_path
    yield server
    server.terminate()
    server.wait(120)
    log.close()


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


@pytest.fixture(scope="module")
def page(url):
    folder = ARTIFACTS / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        outside = []  # the page must not reach beyond the app (no CDN, no analytics)
        page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
        page.goto(url)
        page.wait_for_selector("#model-info strong", timeout=LONG)  # the server's first load imports diffusers
        page.outside_requests = outside
        page.artifacts = folder
        yield page
        browser.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into a Number, or into a Slider's number box, and commit it as a person would (Enter, blur)."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def click_and_wait_for_image(page, button: str) -> None:
    """Click `button`, then wait until the page has fetched the image file the event sent back (and drawn it)."""
    with page.expect_response(lambda r: "file=" in r.url and r.url.endswith(".png"), timeout=LONG):
        page.click(button)
    page.wait_for_timeout(3000)  # the editor draws its new background on the next frames (slow on a loaded CPU)


def result_or_message(page, selector: str) -> None:
    """Wait for `selector` or an error toast; fail with the toast's text if that came first."""
    page.wait_for_selector(f"{selector}, .toast-body", timeout=LONG)
    toasts = page.locator(".toast-body").all_inner_texts()
    assert not toasts, toasts


def expect_message(page, text: str) -> None:
    """Wait for a message in the page that says `text`, then close every message (as a person would)."""
    page.locator(".toast-body", has_text=text).first.wait_for(timeout=60_000)
    page.wait_for_function("() => { document.querySelectorAll('.toast-close').forEach(b => b.click());"
                           " return !document.querySelector('.toast-body'); }", timeout=30_000)


def start_evaluation(page, samples: int, steps: int) -> str:
    """Press Evaluate with these numbers; the running evaluation's folder name as its status shows it (Gradio may
    prefix its own timer text, e.g. "0.1s")."""
    set_number(page, "eval-samples", samples)
    set_number(page, "eval-steps", steps)
    page.click("#eval-start")
    page.wait_for_function("() => /: running/.test(document.querySelector('#eval-status').innerText)",
                           timeout=30_000)
    return re.search(r"(\S+): running", page.inner_text("#eval-status")).group(1)


def image_size(page, selector: str) -> tuple[int, int]:
    image = page.locator(selector).first
    image.wait_for(timeout=LONG)
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=image.element_handle(), timeout=LONG)
    return image.evaluate("e => [e.naturalWidth, e.naturalHeight]")


def test_the_page_names_the_trained_model(page):
    assert "runs/punks-tiny/pipeline" in page.inner_text("#model-info")
    assert "24x24 RGB, T = 100" in page.inner_text("#model-info")


def test_generate_shows_the_grid_and_the_animation(page):
    set_number(page, "gen-steps", 5)
    page.click("#generate-button")
    result_or_message(page, "#gen-grid img")
    width, height = image_size(page, "#gen-grid img")
    assert width > 4 * 24 and width >= height  # 16 tiles, upscaled
    image_size(page, "#gen-animation img")
    assert not page.locator("#condition").is_visible()  # an unconditional model: nothing to ask for
    assert "Recommended for this model: DDIM, 50 steps, eta 1." in page.inner_text("#gen-sampling-note")
    page.screenshot(path=page.artifacts / "generate.png", full_page=True)
    assert not page.outside_requests


def pick_model(page, name: str, says: str) -> None:
    """Type a model's folder into the picker, as a person would, and wait until the page describes it."""
    model = page.locator("#model input")
    model.fill(name)
    model.press("Enter")
    page.wait_for_function(f"() => document.querySelector('#model-info').innerText.includes({says!r})")


def choose(page, elem_id: str, option: str) -> None:
    """Pick `option` in a dropdown: type it (the list narrows to it), press Enter."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(option)
    page.locator(f"[role=option][aria-label={json.dumps(option)}]").wait_for(timeout=30_000)
    box.press("Enter")
    page.wait_for_function(f"() => document.querySelector('#{elem_id} input').value === {option!r}")


def generate_new_grid(page) -> None:
    """Press Generate and wait until the grid shows new samples (or fail with the message the page showed)."""
    before = page.locator("#gen-grid img").first.get_attribute("src") if page.locator("#gen-grid img").count() else None
    page.click("#generate-button")
    page.wait_for_function("([before]) => { const img = document.querySelector('#gen-grid img');"
                           " return document.querySelector('.toast-body') || (img && img.src !== before); }",
                           arg=[before], timeout=LONG)
    toasts = page.locator(".toast-body").all_inner_texts()
    assert not toasts, toasts


def open_form(page, model: str, says: str, title: str, shown: str, hidden: str) -> None:
    """Pick a conditional model; wait for its form (`title`), with `shown` visible and `hidden` not."""
    pick_model(page, model, says)
    page.locator("#condition-title", has_text=title).wait_for(timeout=30_000)
    page.locator(shown).wait_for(state="visible", timeout=30_000)
    page.locator(hidden).wait_for(state="hidden", timeout=30_000)


def test_the_punk_builder_asks_for_a_type_and_accessories(page):
    open_form(page, "runs/tiny-punks/pipeline", "conditioned on type, accessories", "Punk builder", "#punk-type",
              "#digit-picker")
    page.wait_for_function("() => document.querySelectorAll('#punk-accessories label').length === 6")
    ticks = page.locator("#punk-accessories label")
    assert [t.strip() for t in ticks.all_inner_texts()] == list(PUNK_ACCESSORIES)  # from the model's vocabulary
    page.locator("#punk-type input").click()
    page.locator("[role=option]").first.wait_for(timeout=30_000)
    offered = [o.get_attribute("aria-label") for o in page.locator("[role=option]").all()]
    assert offered == ["(any)", *PUNK_TYPES]
    choose(page, "punk-type", "Ape")
    page.get_by_label("Cap", exact=True).check()
    page.get_by_label("3D Glasses", exact=True).check()
    set_number(page, "guidance", 2.5)
    set_number(page, "gen-images", 4)
    set_number(page, "gen-steps", 3)
    # bad input: accessories ticked while the model is to choose them; a message, and the page goes on working
    page.locator("#punk-model-chooses input").check()
    page.click("#generate-button")
    expect_message(page, "Cap, 3D Glasses ticked, but the model is to choose the accessories")  # in ticking order
    page.locator("#punk-model-chooses input").uncheck()
    generate_new_grid(page)
    width, height = image_size(page, "#gen-grid img")
    assert width == height == 2 * (8 * 12 + 2)  # 2x2 tiles of 8 px shown at 96 px, 1 px gaps
    page.screenshot(path=page.artifacts / "punk-builder.png", full_page=True)


def test_the_digit_picker_and_a_students_step_count(page):
    open_form(page, "runs/tiny-digits/pipeline", "distilled to 4 steps", "Digit picker", "#digit-picker",
              "#punk-type")
    # the student's own sampling: DDIM with trailing steps, 4 of them, eta 0, and a note that it holds only there
    page.wait_for_function("() => document.querySelector('#gen-steps input[type=number]').value === '4'")
    assert page.input_value("#gen-sampler input") == "DDIM, trailing steps"
    assert "distilled to sample in 4 steps" in page.inner_text("#gen-sampling-note")
    assert page.input_value("#gen-eta input[type=number]") == "0"
    offered = [t.strip() for t in page.locator("#digit-picker label").all_inner_texts()]
    assert offered == ["(any)", *"0123456789"]
    page.locator("#digit-picker").get_by_label("7", exact=True).check()
    set_number(page, "gen-images", 9)
    generate_new_grid(page)
    width, height = image_size(page, "#gen-grid img")
    assert width == height == 3 * (8 * 12 + 2)
    page.screenshot(path=page.artifacts / "digit-picker.png", full_page=True)
    # the user's choice wins, and sampling the student at another step count says what that costs
    set_number(page, "gen-steps", 8)
    page.click("#generate-button")
    expect_message(page, "distilled to sample in 4 steps (ddim-trailing); its quality is only guaranteed there")
    pick_model(page, "runs/punks-tiny/pipeline", "T = 100")  # the other tests use the trained model
    page.wait_for_function("() => !document.querySelector('#condition') || "
                           "document.querySelector('#condition').offsetParent === null")


def test_inpaint_fills_a_painted_mask(page):
    page.get_by_role("tab", name="Inpaint & reconstruct").click()
    # the dataset the model was trained on is offered first
    page.wait_for_function("() => document.querySelector('#inpaint-dataset input').value.includes('punks-120')")
    click_and_wait_for_image(page, "#load-image")
    canvas = page.locator("#mask-editor canvas").first.bounding_box()
    x, y = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(x - 80, y - 60)
    page.mouse.down()
    for i in range(1, 41):  # a stroke across the punk's head
        page.mouse.move(x - 80 + 4 * i, y - 60)
    page.mouse.up()
    page.get_by_text("RePaint settings").click()
    set_number(page, "inpaint-steps", 10)
    set_number(page, "inpaint-jump", 5)
    set_number(page, "inpaint-resample", 1)
    set_number(page, "inpaint-fills", 2)
    page.click("#inpaint-button")
    result_or_message(page, "#inpaint-result img")
    width, height = image_size(page, "#inpaint-result img")
    assert width > 3 * height  # original, mask, two fills in a row
    page.screenshot(path=page.artifacts / "inpaint.png", full_page=True)


def test_a_path_outside_the_roots_is_refused_in_the_page(page, url):
    model = page.locator("#model input")
    model.fill("../../../etc")
    model.press("Enter")
    toast = page.locator(".toast-body", has_text="outside the model folders")
    toast.first.wait_for(timeout=30_000)
    page.screenshot(path=page.artifacts / "bad-input.png", full_page=True)
    model.fill("runs/punks-tiny/pipeline")
    model.press("Enter")
    page.wait_for_function("() => document.querySelector('#model-info').innerText.includes('T = 100')")


def test_train_watch_stop_and_the_checkpoint_listed(page, mnist_dir):
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function("() => document.querySelector('#train-dataset input').value.endsWith('mnist')")
    page.fill("#train-name :is(input, textarea)", "browser-run")
    for elem_id, value in [("train-steps", 100_000), ("train-batch", 8), ("train-warmup", 0),
                           ("train-sample-every", 5), ("train-checkpoint-every", 3), ("train-max-images", 64)]:
        set_number(page, elem_id, value)
    page.fill("#train-overrides textarea", "\n".join(TINY))
    clicked = time.time()
    page.click("#train-start")
    page.wait_for_function("() => /browser-run: running/.test(document.querySelector('#run-status').innerText)",
                           timeout=30_000)

    def step() -> int:
        match = re.search(r"Step (\d+)", page.inner_text("#run-status"))
        return int(match.group(1)) if match else 0

    page.wait_for_function("() => /Step [1-9]/.test(document.querySelector('#run-status').innerText)",
                           timeout=LONG)
    first = step()
    page.wait_for_function(f"() => (/Step (\\d+)/.exec(document.querySelector('#run-status').innerText) || [0, 0])[1]"
                           f" > {first}", timeout=LONG)
    page.wait_for_function("() => document.querySelector('#run-checkpoints').innerText.includes('checkpoint-')",
                           timeout=LONG)
    # time left: the launch's average pace over 100,000 steps (losses arrive in bursts; the last burst's pace
    # once read "about 0:01 left" for a run of hours)
    page.wait_for_function("() => / left/.test(document.querySelector('#run-status').innerText)", timeout=LONG)
    status = page.inner_text("#run-status")
    shown = _seconds(re.search(r"about ([\d:]+) left", status).group(1))
    honest = (100_000 - step()) * (time.time() - clicked) / step()
    assert honest / 3 < shown < honest * 3, (status, honest)
    page.screenshot(path=page.artifacts / "train-running.png", full_page=True)
    page.click("#train-stop")
    page.wait_for_function("() => /browser-run: stopped by you/.test(document.querySelector('#run-status').innerText)",
                           timeout=LONG)
    listed = page.inner_text("#run-checkpoints")
    assert re.search(r"checkpoint-\d+", listed)
    page.screenshot(path=page.artifacts / "train-stopped.png", full_page=True)


def test_evaluate_the_model_to_its_report(page, roots):
    if not eval_available():
        pytest.skip("this punkdiff has no `punkdiff eval`")
    page.get_by_role("tab", name="Evaluate").click()
    # the reference is the data the model was trained on, and the page says so
    page.wait_for_function("() => document.querySelector('#eval-reference input').value.endsWith('punks-120')")
    assert "the data this model was trained on" in page.inner_text("#eval-reference-note")
    assert page.input_value("#eval-split textarea, #eval-split input") == "train"
    page.screenshot(path=page.artifacts / "evaluate.png", full_page=True)

    # bad input: a message in the page, nothing started, and the page goes on working
    set_number(page, "eval-samples", 0)
    page.click("#eval-start")
    expect_message(page, "number of samples must be a whole number of at least 2, got 0")
    set_number(page, "eval-samples", 16)
    set_number(page, "eval-steps", 3)
    reference = page.locator("#eval-reference input")
    reference.fill("../../../etc")
    reference.press("Enter")
    page.click("#eval-start")
    expect_message(page, "outside the data folders")
    assert not (roots.runs / "evaluations").exists()
    # a dataset that fails to load: the evaluation fails, and its status says why
    reference.fill(str(roots.of("data")[1] / "empty"))
    reference.press("Enter")
    page.wait_for_function("() => document.querySelector('#eval-reference-note').innerText"
                           ".includes('Not the data this model was trained on')")
    page.click("#eval-start")
    page.wait_for_function("() => /: failed/.test(document.querySelector('#eval-status').innerText)", timeout=LONG)
    assert "is empty (no images or data files)" in page.inner_text("#eval-status")
    page.screenshot(path=page.artifacts / "evaluate-failed.png", full_page=True)

    # too many samples: refused with the cap; a long evaluation stopped from the page never blocks the next one
    reference.fill("data/punks-120")
    reference.press("Enter")
    set_number(page, "eval-samples", 10**12)
    page.click("#eval-start")
    expect_message(page, "number of samples must be at most 50,000")
    long_one = start_evaluation(page, 50_000, 100)
    page.screenshot(path=page.artifacts / "evaluate-running.png", full_page=True)
    page.click("#eval-stop")
    page.wait_for_function("() => /: stopped by you/.test(document.querySelector('#eval-status').innerText)",
                           timeout=LONG)
    assert Job(roots.runs / "evaluations" / long_one).status() == "stopped"
    page.screenshot(path=page.artifacts / "evaluate-stopped.png", full_page=True)
    page.wait_for_timeout(1100)  # evaluation folders are named by the second

    # the real thing: a few samples in a few steps, scored against the training data, to the report
    name = start_evaluation(page, 16, 3)
    # about a minute on 2 idle cores; several on a loaded machine (sampling, a classifier, the metrics)
    page.wait_for_function("() => /: finished/.test(document.querySelector('#eval-status').innerText)",
                           timeout=5 * LONG)
    page.locator("#eval-report table").first.wait_for(timeout=30_000)
    written = json.loads((roots.runs / "evaluations" / name / "metrics.json").read_text())
    assert written["num_images"] == 16 and "punks-120" in written["reference"]
    shown = {}
    for row in page.locator("#eval-report table tr").all_inner_texts():
        cells = [c.strip() for c in row.split("\t")]
        if len(cells) == 4 and cells[0] in written["metrics"]:
            shown[cells[0]] = cells[1:]
    # every metric the evaluation wrote is in the page, its number beside its floor
    assert set(shown) == set(written["metrics"])
    for metric, value in written["metrics"].items():
        assert shown[metric] == [_format(value["model"]), _format(value["floor"]), value["better"]], metric
    # the figures are images in the page, drawn from the evaluation's own files
    for alt in ("Class histogram", "nearest training image"):
        image = page.locator(f"#eval-report img[alt*='{alt}']").first
        image.scroll_into_view_if_needed()
        width, _ = image_size(page, f"#eval-report img[alt*='{alt}']")
        assert width > 100 and image.get_attribute("src").startswith("data:image/png;base64,")
    page.screenshot(path=page.artifacts / "evaluate-report.png", full_page=True)
    assert not page.outside_requests


def test_jobs_end_with_the_server(page, server, roots):
    """The last test: an evaluation started from the page is stopped when the server is stopped (SIGTERM)."""
    if not eval_available():
        pytest.skip("this punkdiff has no `punkdiff eval`")
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-reference input").fill("data/punks-120")
    page.locator("#eval-reference input").press("Enter")
    page.wait_for_timeout(1100)  # evaluation folders are named by the second
    name = start_evaluation(page, 50_000, 100)
    job = Job(roots.runs / "evaluations" / name)
    pid = job.latest()["pid"]
    server.terminate()
    assert server.wait(120) == 0, server.log_path.read_text()[-3000:]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert job.status() == "stopped"


def _seconds(text: str) -> int:
    """`M:SS` or `H:MM:SS`, as the Train tab prints a duration, in seconds."""
    seconds = 0
    for part in text.split(":"):
        seconds = 60 * seconds + int(part)
    return seconds


def _format(value) -> str:
    """A number as the report prints it."""
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
