"""What planning needs of the built-in random-weight models (tiny:, shape:), stored as data.

Building their transformers configs imports torch (seconds); planning only needs depth, width,
context, vocabulary and the config hash that goes into unit keys. tests/test_shapes.py rebuilds
every entry from transformers (the version pyproject.toml pins) and fails when one differs:
then regenerate the table with `python -m tasks.config_facts`.
"""

from __future__ import annotations

# name -> (n_layers, d_model, max_positions, vocab_size, config_sha256 as in the identity).
CONFIG_FACTS: dict[str, tuple[int, int, int, int, str]] = {
    "tiny:gpt2": (4, 32, 128, 96,
                  "82bd380aecd8180c1eb58710aa71ba628397b652712f0e17ef6ff8dc8e549182"),
    "tiny:llama": (4, 32, 128, 96,
                   "916f320dfb9f28a48c0b474d8910da2a54b1cb4321e7816b60eae739da9107a2"),
    "tiny:gemma2": (4, 32, 128, 96,
                    "e69f0a18a33f0e03d564923872317c7adaf7fa52ca65e1a61b1fc55d53299bf2"),
    "tiny:gemma3": (4, 32, 128, 96,
                    "c156a0bf62b39849a2c5c546dcb1aff70d9a287d29d56106deebecf35301d953"),
    "shape:gemma-2-2b": (26, 2304, 8192, 256000,
                         "e9cba830297f87ca8fb72611808e480f12afe155641598ceface16a65aeb32e6"),
    "shape:llama-3.2-3b": (28, 3072, 131072, 128256,
                           "ba46babd9a7f63c469072c14feaa96e96adc9094c2edfff57390f6956b6a6a43"),
    "shape:gpt2-xl": (48, 1600, 1024, 50257,
                      "8b1492b9859505516645cc11c86d340f7c4610e98c4e3ea5adbac7c9001f7c4a"),
    "shape:gpt2-small": (12, 768, 1024, 50257,
                         "ceec5ee77c447bcb4df30cb62001bffd8c3eb20fa6629b2edada993c34b4b542"),
    "shape:gemma-2-2b/4": (26, 576, 8192, 64000,
                           "5cc1db722bf56394efc79bc5bfed6f657737eb38bc94bcc6993dcb70477771ef"),
    "shape:llama-3.2-3b/4": (28, 768, 131072, 32064,
                             "0cd43039aa4c33fe2631b427793c36b78d0c002440704c36070017abb916914b"),
    "shape:gpt2-xl/4": (48, 400, 1024, 12564,
                        "cb1e7d34461b15ecb564d23ceda8f0f591186035a2f120b7d5cce3b073a32bf3"),
}


def computed_facts(name: str) -> tuple[int, int, int, int, str]:
    """The entry for `name` rebuilt from its transformers config (imports torch)."""
    from tasks.model_catalog import config_model_info

    m = config_model_info(name)
    return (m.n_layers, m.d_model, m.max_positions, int(m.vocab_size or 0),
            m.identity["config_sha256"])


if __name__ == "__main__":  # regenerate the table after a transformers upgrade
    for model in CONFIG_FACTS:
        print(f"    {model!r}: {computed_facts(model)},")
