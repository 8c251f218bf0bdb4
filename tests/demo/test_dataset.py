"""The demo's generated dataset, its pixel classifier and its tokenizer."""

import json

import numpy as np
import pytest

from jaxsd.demo import classifier, shapes, tokenizer


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heldout")
    labels = shapes.write_dataset(folder, 240, seed=123)
    return folder, labels


def test_dataset_layout_balance_and_determinism(heldout, tmp_path):
    folder, labels = heldout
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 240 and all(p.with_suffix(".txt").is_file() for p in pngs)
    assert (folder / "00000.txt").read_text().strip() == labels[0].caption
    counts = {(e.colour, e.shape) for e in labels}
    assert len(counts) == len(shapes.COLOURS) * len(shapes.SHAPES) >= 12
    images, read = shapes.read_labelled_folder(folder)
    assert images.shape == (240, 32, 32, 3) and images.dtype == np.uint8 and read == labels
    # Same seed → same bytes; other seed → other images.
    assert shapes.write_dataset(tmp_path / "a", 240, seed=123) == labels
    np.testing.assert_array_equal(shapes.read_labelled_folder(tmp_path / "a")[0], images)
    shapes.write_dataset(tmp_path / "b", 240, seed=124)
    assert not np.array_equal(shapes.read_labelled_folder(tmp_path / "b")[0], images)


def test_sizes_and_positions_vary(heldout):
    images, _labels = shapes.read_labelled_folder(heldout[0])
    bg = images[:, 0, 0].astype(float)
    fg = np.linalg.norm(images.astype(float) - bg[:, None, None], axis=-1) > 60
    areas = fg.sum(axis=(1, 2))
    centres = np.array([np.argwhere(m).mean(0) for m in fg])
    assert areas.max() > 2.5 * areas.min()
    assert centres.std(axis=0).min() > 3.0


def test_classifier_on_real_heldout_images(heldout):
    images, labels = shapes.read_labelled_folder(heldout[0])
    acc = classifier.accuracy(images, labels)
    assert acc["colour_accuracy"] >= 0.99 and acc["shape_accuracy"] >= 0.99, acc


def test_classifier_can_fail():
    blank = np.full((32, 32, 3), 220, np.uint8)
    assert classifier.classify(blank) == classifier.Prediction(None, None)
    images = np.stack([blank, blank])
    labels = [shapes.Example("red", "circle"), shapes.Example("blue", "square")]
    assert classifier.accuracy(images, labels) == {"colour_accuracy": 0.0, "shape_accuracy": 0.0}
    # A red square is not called a red circle.
    rng = np.random.default_rng(0)
    p = classifier.classify(shapes.render(shapes.Example("red", "square"), rng))
    assert (p.colour, p.shape) == ("red", "square")
    with pytest.raises(ValueError, match=r"RGB image \[H, W, 3\]"):
        classifier.classify(np.zeros((32, 32)))


def test_bad_caption_is_reported(tmp_path):
    shapes.write_dataset(tmp_path, 2, seed=0)
    (tmp_path / "00001.txt").write_text("a mauve blob\n")
    with pytest.raises(ValueError, match="00001.txt.*'a mauve blob'"):
        shapes.read_labelled_folder(tmp_path)


def test_tokenizer_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    captions = [e.caption for e in shapes.all_prompts()]
    vocab = tokenizer.build_tokenizer(tmp_path, captions)
    assert {p.name for p in tmp_path.iterdir()} == {
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ids = tok(["a red circle", "A Yellow TRIANGLE", "a mauve blob"], padding="max_length",
              max_length=tok.model_max_length).input_ids
    assert tok.convert_ids_to_tokens(ids[0][:5]) == [
        tokenizer.BOS, "a</w>", "red</w>", "circle</w>", tokenizer.EOS]
    assert ids[1][:5] == [vocab[tokenizer.BOS], vocab["a</w>"], vocab["yellow</w>"], vocab["triangle</w>"],
                          vocab[tokenizer.EOS]]
    # Unknown words fall back to byte symbols, not to <unk>.
    assert tok.decode(ids[2], skip_special_tokens=True) == "a mauve blob"
    assert len(ids[0]) == tokenizer.MAX_LENGTH
    config = tokenizer.tiny_text_encoder_config(vocab)
    assert config["vocab_size"] == len(vocab) == max(vocab.values()) + 1
    text_config = transformers.CLIPTextConfig(**config)
    assert text_config.eos_token_id == vocab[tokenizer.EOS]
    json.dumps(config)
