"""Tiny diffusers pipelines built offline from randomly initialised components, the way diffusers' own fast tests
build them (no hub): Stable Diffusion text2img / img2img with channels (4, 8), 2 norm groups and a 2-layer CLIP text
encoder whose tokenizer is written from a byte-level vocabulary to a temporary directory; DDIM / DDPM pipelines on a
UNet2DModel with channels (32, 64)."""
from __future__ import annotations

import json
import os
import tempfile

import torch

SD_SIZE = 16  # pixels: 8×8 latents (the VAE halves the resolution once)


def _bytes_to_unicode():
    """GPT-2's reversible byte → printable character map (the byte-level BPE alphabet CLIP uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _byte_vocab_tokenizer():
    """A CLIPTokenizer over the 256 byte characters (and their end-of-word forms), no merges: in memory with
    transformers >= 5 (vocab=, merges=), through a temporary vocab/merges file pair before."""
    import inspect

    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    d = tempfile.mkdtemp(prefix="fd_tok_")
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=os.path.join(d, "vocab.json"), merges_file=os.path.join(d, "merges.txt"),
                         model_max_length=77)


def sd_components(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=SD_SIZE // 2,
                                in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2, sample_size=SD_SIZE)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                                        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
                                        pad_token_id=1, vocab_size=1000))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=_byte_vocab_tokenizer(),
                scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


_CACHE: dict = {}


def sd_pipe(kind: str = "text2img"):
    """A fresh pipeline object over shared (cached) components; kind "text2img" | "img2img"."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    if "sd" not in _CACHE:
        _CACHE["sd"] = sd_components()
    comp = dict(_CACHE["sd"])
    cls = StableDiffusionPipeline if kind == "text2img" else StableDiffusionImg2ImgPipeline
    pipe = cls(**comp)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet2d(seed: int = 0):
    from diffusers import UNet2DModel

    if "unet2d" not in _CACHE:
        torch.manual_seed(seed)
        _CACHE["unet2d"] = UNet2DModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=3,
                                       out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    return _CACHE["unet2d"]


def unet_pipe(kind: str, scheduler):
    from diffusers import DDIMPipeline, DDPMPipeline

    pipe = (DDIMPipeline if kind == "ddim" else DDPMPipeline)(unet=unet2d(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_image(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, SD_SIZE, SD_SIZE, generator=g)


class UNetInputs:
    """Records the U-Net's input sample at every call (forward pre-hook)."""

    def __init__(self, unet):
        self.seen = []
        self.h = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.seen.append((x.detach().clone(), float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)))

    def close(self):
        self.h.remove()


def sdxl_pipe():
    """A tiny StableDiffusionXLPipeline (two 2-layer CLIP text encoders, text_time added conditioning), built as
    diffusers' fast tests build it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if "sdxl" not in _CACHE:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=SD_SIZE // 2,
                                    in_channels=4, out_channels=4,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                    projection_class_embeddings_input_dim=80, cross_attention_dim=64,
                                    norm_num_groups=2).eval()
        cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                             num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000,
                             hidden_act="gelu", projection_dim=32)
        sd = sd_pipe()
        _CACHE["sdxl"] = dict(unet=unet, vae=sd.vae, text_encoder=CLIPTextModel(cfg).eval(),
                              text_encoder_2=CLIPTextModelWithProjection(cfg).eval(), tokenizer=sd.tokenizer,
                              tokenizer_2=sd.tokenizer,
                              scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                               beta_schedule="scaled_linear", steps_offset=1,
                                                               timestep_spacing="leading"))
    pipe = StableDiffusionXLPipeline(**dict(_CACHE["sdxl"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet_pipe():
    """A tiny StableDiffusionControlNetPipeline: the tiny SD components and a ControlNet made from its U-Net."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    if "controlnet" not in _CACHE:
        torch.manual_seed(0)
        _CACHE["controlnet"] = ControlNetModel.from_unet(sd_pipe().unet,
                                                         conditioning_embedding_out_channels=(4, 8)).eval()
    comp = dict(sd_pipe().components)
    comp["controlnet"] = _CACHE["controlnet"]
    pipe = StableDiffusionControlNetPipeline(**comp)
    pipe.set_progress_bar_config(disable=True)
    return pipe
