"""model_context: the positions a model (or a composition) can attend to."""

from types import SimpleNamespace

from transformers import LlamaConfig, LlavaConfig

from moeforge.utils.positions import model_context


def test_context_of_plain_multimodal_and_composed_models():
    assert model_context(SimpleNamespace(config=LlamaConfig(max_position_embeddings=128))) == 128
    # a multimodal config keeps the language model's positions in text_config
    llava = LlavaConfig(text_config=LlamaConfig(max_position_embeddings=77).to_dict())
    assert model_context(SimpleNamespace(config=llava)) == 77
    composed = SimpleNamespace(config=LlamaConfig(max_position_embeddings=128),
                               augmenting=SimpleNamespace(config=LlamaConfig(max_position_embeddings=64)))
    assert model_context(composed) == 64
    assert model_context(SimpleNamespace()) is None
