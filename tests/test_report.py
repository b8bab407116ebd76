"""The feature browser: built from a real store, checked as text and as rendered by headless Chromium."""

import shutil
import subprocess

import numpy as np
import pytest

from flows.stages import HISTOGRAM_FILE, REPORT_FILE, write_report
from sae.config import SAEConfig
from sae.features import SparseCodes, latent_card
from sae.lm import load_lm
from sae.model import TopKSAE
from storage import activations as store
from storage.corpus import split_contexts

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report_dir(tiny_model_dir, text_dir, tmp_path_factory):
    model, tokenizer = load_lm(str(tiny_model_dir), "float32", "cpu")
    train, heldout = split_contexts(str(text_dir), tokenizer, 16, 4, 40, 0.5)
    url = str(tmp_path_factory.mktemp("store") / "s")
    store.plan_store(url, {"train": train, "eval": heldout}, ["model.layers.1"], d_model=32, first_position=1,
                     attrs={}, shard_contexts=16)
    for split, i in store.missing_shards(url):
        store.write_shard(url, split, i, model, 8)
    store.finalize_store(url)
    sae = TopKSAE(SAEConfig(32, 64, 4))
    out = tmp_path_factory.mktemp("report")
    write_report(sae, store.open_store(url), "model.layers.1", model, tokenizer, 10**6, out, "tiny report",
                 {"normalized_mse": 0.5}, n_latents=6)
    return out


def test_report_is_self_contained(report_dir):
    page = (report_dir / REPORT_FILE).read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("class='card'") == 6 + 3  # 6 random latents, 3 most frequent
    assert "top activations" in page and "promotes:" in page and "activation quantile" in page
    assert (report_dir / HISTOGRAM_FILE).read_bytes().startswith(b"\x89PNG")


def test_latent_card_top_contexts_are_the_strongest():
    rng = np.random.default_rng(0)
    n_rows, positions = 60, 5  # 12 contexts of 6 tokens, first position dropped
    values = rng.uniform(0.1, 1, (n_rows, 2)).astype(np.float32)
    indices = rng.integers(0, 4, (n_rows, 2))
    indices[:, 1] = (indices[:, 0] + 1) % 4
    codes = SparseCodes(values, indices, positions, 1)
    card = latent_card(codes, 2, context_length=6, n_top=3)
    acts = np.where(indices == 2, values, 0).sum(1).reshape(12, positions)
    assert [e.context for e in card.top] == list(np.argsort(-acts.max(1), kind="stable")[:3])
    assert card.top[0].activations[0] == 0.0 and len(card.top[0].activations) == 6
    assert card.top[0].max_activation == pytest.approx(acts.max())
    assert card.frequency == pytest.approx((acts > 0).mean())


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (report_dir / REPORT_FILE).as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="ctx"') >= 9  # contexts rendered as elements
    assert "background:rgba(255,110,0," in dom  # per-token shading survived parsing
    assert 'class="tok"' in dom and "latent " in dom
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1000,1400", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
