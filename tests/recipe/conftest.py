import pytest
import torch

from tests.hf_tiny import save_tiny_gpt2, save_tiny_llama


def _finetune(folder, seed: int, scale: float = 0.02):
    """A 'fine-tuned' copy of a base model: every tensor plus small noise (so task vectors have mixed signs)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    a = save_tiny_llama(root / "a", seed=0)
    b = save_tiny_llama(root / "b", seed=1)
    base = save_tiny_llama(root / "base", seed=2)
    ft1 = _finetune(save_tiny_llama(root / "ft1", seed=2), seed=11)
    ft2 = _finetune(save_tiny_llama(root / "ft2", seed=2), seed=12)
    return {"a": a, "b": b, "base": base, "ft1": ft1, "ft2": ft2}


@pytest.fixture(scope="session")
def gpt2s(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2s")
    base = save_tiny_gpt2(root / "base", seed=3)
    ft1 = _finetune(save_tiny_gpt2(root / "ft1", seed=3), seed=21)
    ft2 = _finetune(save_tiny_gpt2(root / "ft2", seed=3), seed=22)
    return {"base": base, "ft1": ft1, "ft2": ft2}


@pytest.fixture(scope="session")
def lora(tmp_path_factory, llamas):
    """A PEFT LoRA adapter on llamas['a'], saved by PEFT itself."""
    from peft import LoraConfig

    from tests.ops.adapters.peft_helpers import make_adapter

    return make_adapter(llamas["a"], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                        tmp_path_factory.mktemp("lora") / "adapter", seed=5)
