"""Runs inside the peers' own venv (SAELens, sparsify; no saeflow): loads or makes an SAE with the
peer's own code and writes its codes and reconstructions of given inputs, all as safetensors.

    python peer_roundtrip.py load saelens|sparsify SAE_DIR INPUTS OUT
    python peer_roundtrip.py make saelens|sparsify SAE_DIR INPUTS OUT N K NORM [KIND]
        (random SAE, nonzero biases; KIND for sparsify: transcode or skip; for SAELens: one of its
        ReLU / JumpReLU architectures, standard .. jumprelu_skip_transcoder, random thresholds)
    python peer_roundtrip.py attach saelens SAE_DIR TOKENS OUT            (HookedSAETransformer, tiny model)
    python peer_roundtrip.py many JOBS.json      (a JSON list of the argument lists above, in one process)
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def saelens_outputs(sae, x):
    """Codes, and the output of SAELens's own forward (a skip-transcoder's adds x @ W_skip.T)."""
    with torch.no_grad():
        codes = sae.encode(x)
        return codes, sae(x) if hasattr(sae, "W_skip") else sae.decode(codes)


def saelens_dictionary(kind, d, n, layer_norm, g):
    """A SAELens ReLU or JumpReLU SAE or transcoder of `kind` (its architecture name), made by its own
    classes, with random weights and thresholds."""
    from sae_lens.saes import transcoder as tc
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    made = {
        "standard": (StandardSAE, StandardSAEConfig),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
        "transcoder": (tc.Transcoder, tc.TranscoderConfig),
        "skip_transcoder": (tc.SkipTranscoder, tc.SkipTranscoderConfig),
        "jumprelu_transcoder": (tc.JumpReLUTranscoder, tc.JumpReLUTranscoderConfig),
        "jumprelu_skip_transcoder": (tc.JumpReLUSkipTranscoder, tc.JumpReLUSkipTranscoderConfig),
    }
    model, config = made[kind]
    if "transcoder" in kind:
        cfg = config(d_in=d, d_sae=n, d_out=d, apply_b_dec_to_input=False)
        cfg.metadata.hook_name, cfg.metadata.hook_name_out = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    else:
        cfg = config(d_in=d, d_sae=n, normalize_activations="layer_norm" if layer_norm else "none")
        cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    sae = model(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, n, generator=g) / d**0.5)
        sae.W_dec.copy_(torch.randn(n, d, generator=g) / d**0.5)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(n, generator=g))
        if hasattr(sae, "W_skip"):
            sae.W_skip.copy_(torch.randn(d, d, generator=g) / d)
    return sae


def sparsify_outputs(sae, x):
    """Codes, and the output of sparsify's own forward (a skip-transcoder's adds x @ W_skip.mT)."""
    with torch.no_grad():
        out = sae.encode(x)
        codes = torch.zeros(x.shape[0], sae.num_latents).scatter_(1, out.top_indices, out.top_acts)
        return codes, sae(x).sae_out


def make(library, directory, d, n, k, layer_norm, kind="sae"):
    g = torch.Generator().manual_seed(0)
    if library == "saelens" and kind != "sae":
        sae = saelens_dictionary(kind, d, n, layer_norm, g)
        sae.save_model(directory)
        return sae
    if library == "saelens":
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

        sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=k, normalize_activations="layer_norm" if layer_norm else "none"))
        with torch.no_grad():
            sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
            sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        sae.save_model(directory)
        return sae
    from sparsify import SparseCoder, SparseCoderConfig

    config = SparseCoderConfig(num_latents=n, k=k, transcode=kind != "sae", skip_connection=kind == "skip")
    sae = SparseCoder(d, config)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn(n, d, generator=g) / d**0.5)
        sae.encoder.bias.copy_(torch.randn(n, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        if kind != "sae":  # a transcoder's decoder starts at zero in sparsify: give it one
            sae.W_dec.copy_(torch.randn(n, d, generator=g) / d**0.5)
        if sae.W_skip is not None:
            sae.W_skip.copy_(torch.randn(d, d, generator=g) / d)
    sae.save_to_disk(directory)
    return sae


def attach(directory, tokens, out):
    """A randomly initialised TransformerLens model of the SAE's width (nothing downloaded): SAELens
    attaches the exported SAE at the hook its config names; writes the activations that reached the
    SAE there and the codes it computed of them."""
    from sae_lens import SAE, HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    sae = SAE.load_from_disk(directory)
    d = sae.cfg.d_in
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=d, d_head=d // 4, n_heads=4, d_mlp=2 * d, d_vocab=50, n_ctx=16, act_fn="gelu", seed=0
    )
    model = HookedSAETransformer(cfg)
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    save_file(
        {
            "resid": cache[f"{hook}.hook_sae_input"].reshape(-1, d).contiguous(),
            "codes": cache[f"{hook}.hook_sae_acts_post"].reshape(-1, sae.cfg.d_sae).contiguous(),
        },
        out,
    )


def run(args):
    action, library, directory, inputs, out = args[:5]
    if action == "attach":
        return attach(directory, load_file(inputs)["tokens"], out)
    x = load_file(inputs)["x"]
    if action == "make":
        kind = args[8] if len(args) > 8 else "sae"
        sae = make(library, directory, x.shape[1], int(args[5]), int(args[6]), args[7] == "layer_norm", kind)
    elif library == "saelens":
        from sae_lens import SAE

        sae = SAE.load_from_disk(directory)
    else:
        from sparsify import SparseCoder

        sae = SparseCoder.load_from_disk(directory)
    codes, recon = (saelens_outputs if library == "saelens" else sparsify_outputs)(sae, x)
    save_file({"codes": codes.contiguous(), "recon": recon.contiguous()}, out)


def main():
    if sys.argv[1] == "many":  # one process for several jobs: importing SAELens takes seconds
        for args in json.loads(open(sys.argv[2]).read()):
            run(args)
    else:
        run(sys.argv[1:])


if __name__ == "__main__":
    main()
