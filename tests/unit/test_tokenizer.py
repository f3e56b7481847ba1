from transformers import CLIPTokenizer

from data_pipelines.latents.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer, save_clip_tokenizer


def test_tokenizes_like_openai_clip():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    # The ids OpenAI's CLIP (and SD 1.x) gives this prompt: BOS, a, photo, of, a, cat, EOS.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.tokenize("an astronaut riding a horse") == [
        "an</w>",
        "astronaut</w>",
        "riding</w>",
        "a</w>",
        "horse</w>",
    ]


def test_pads_to_model_max_length():
    tokenizer = build_clip_tokenizer(max_length=8)
    ids = tokenizer("a handwritten digit seven", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 8
    assert ids[-1] == 49407


def test_saved_folder_reloads_with_same_ids(tmp_path):
    save_clip_tokenizer(tmp_path, max_length=77)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    reloaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded.model_max_length == 77
    assert (
        reloaded("a handwritten digit seven").input_ids == build_clip_tokenizer()("a handwritten digit seven").input_ids
    )
