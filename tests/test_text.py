"""Text conditioning and REPA (issue 21): the CLIP tokenizer and text transformer (engine/perceptual/clip_text.py)
against
`transformers` on random weights and a generated vocabulary; the caption store (engine/data/captions.py) written
by the encoding command and validated like the image datasets; the per-position caption draw (uniform, resumable,
world-size independent through the loader); DINOv2's REPA features (engine/metrics/dinov2.py) against a functional
re-computation of REPA's preprocessing; the REPA loss (engine/objectives/repa.py) against a direct re-computation
for flow matching, Mean Flow and CMT-MF on the MM-DiT."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data.captions import CaptionedLatentSource, CaptionStore, CaptionStoreError, write_caption_store
from engine.data.loader import BatchStream
from engine.data.sampler import ResumableSampler, TensorSource
from engine.errors import EngineError
from engine.metrics.dinov2 import DINOv2
from engine.networks.mmdit import MMDiT
from engine.objectives import REPA, CMTMeanFlow, FlowMatching, MeanFlow, StepRNG
from engine.objectives.meanflow import logit_normal
from engine.objectives.repa import alignment
from engine.perceptual.clip_text import CLIPTextEncoder, CLIPTokenizer, byte_table
from engine.pipelines.encode_captions import encode_store, read_captions
from engine.pipelines.encode_captions import main as encode_main

transformers = pytest.importorskip("transformers")

MERGES = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>"), ("o", "n</w>"), ("m", "at</w>"),
          ("d", "o"), ("do", "g</w>"), ("a", "n"), ("an", "d</w>")]


def clip_directory(path, dim=32):
    """A CLIP text model in the Hugging Face layout with random weights and a generated BPE vocabulary."""
    base = sorted(set(byte_table().values()))
    tokens = base + [c + "</w>" for c in base] + [a + b for a, b in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    os.makedirs(path, exist_ok=True)
    json.dump(vocab, open(os.path.join(path, "vocab.json"), "w"))
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=dim, intermediate_size=2 * dim,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      hidden_act="quick_gelu", bos_token_id=vocab["<|startoftext|>"],
                                      eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(cfg).eval()
    model.save_pretrained(path)
    return model


TEXTS = ["The cat on the mat.", "", "A  Cat and dog at 12:30, they're Here!", "x" * 200 + " the end",
         "Ünïcode café", "a dog and the cat"]


def test_clip_tokenizer_and_text_model_equal_transformers(tmp_path):
    model = clip_directory(tmp_path / "clip")
    ref_tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "clip"))
    ref = ref_tok(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    ids = CLIPTokenizer.from_directory(str(tmp_path / "clip"))(TEXTS)
    assert torch.equal(ids, ref)
    assert ids[3, 76] == ids[0, -1] and (ids[1, 1:] == ids[1, 1]).all()     # truncated to 77; "" is BOS, EOS, pad
    enc = CLIPTextEncoder.from_directory(str(tmp_path / "clip"))
    with torch.no_grad():
        torch.testing.assert_close(enc(ids), model(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert enc.encode(TEXTS).shape == (6, 77, 32)


def test_clip_directory_missing_files_are_named(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(EngineError, match="lacks config.json, vocab.json, merges.txt, model.safetensors or "
                                          "pytorch_model.bin.*openai/clip-vit-large-patch14"):
        CLIPTextEncoder.from_directory(str(tmp_path / "empty"))


def coco_annotations(path, caps):
    ann = dict(images=[dict(id=i) for i in (30, 10, 20)],
               annotations=[dict(image_id=i, caption=c) for i, cs in zip((10, 20, 30), caps) for c in cs])
    json.dump(ann, open(path, "w"))


def test_encoding_command_writes_a_store_that_validates(tmp_path):
    """COCO annotations (images in sorted id order, as U-ViT) → captions, offsets, the null caption "" and the texts;
    every way the store can be wrong is a clear error."""
    clip_directory(tmp_path / "clip")
    caps = [["the cat", "a dog"], ["the mat", "a cat on the mat", "dog"], ["and the end"]]
    coco_annotations(tmp_path / "ann.json", caps)
    assert read_captions(tmp_path / "ann.json") == caps
    out = str(tmp_path / "store")
    assert encode_main(["--captions", str(tmp_path / "ann.json"), "--clip", str(tmp_path / "clip"), "--out", out,
                        "--device", "cpu"]) == 0
    store = CaptionStore(out)
    assert len(store) == 3 and store.offsets.tolist() == [0, 2, 5, 6] and store.texts == caps
    enc = CLIPTextEncoder.from_directory(str(tmp_path / "clip"))
    torch.testing.assert_close(torch.from_numpy(np.asarray(store.captions, dtype=np.float32)),
                               enc.encode([c for cs in caps for c in cs]).half().float())
    torch.testing.assert_close(store.null_context(), enc.encode([""])[0])
    from engine.cli import run_main
    with pytest.raises(SystemExit) as e:                             # a missing CLIP directory: said, exit 2
        run_main(encode_main, ["--captions", str(tmp_path / "ann.json"), "--clip", str(tmp_path / "nowhere"),
                               "--out", out, "--device", "cpu"])
    assert e.value.code == 2
    with pytest.raises(CaptionStoreError, match="exists"):
        write_caption_store(out, np.zeros((1, 77, 32)), np.array([0, 1]), np.zeros((77, 32)), [["x"]])
    # a replacement that would not read back is refused whole: the old store stays, no temporary is left beside it
    with pytest.raises(CaptionStoreError, match="offsets.npy must rise from 0 to the caption count 1"):
        write_caption_store(out, np.zeros((1, 77, 32)), np.array([0, 2]), np.zeros((77, 32)), [["x"]],
                            overwrite=True)
    assert CaptionStore(out).texts == caps and sorted(os.listdir(tmp_path)) == ["ann.json", "clip", "store"]
    write_caption_store(out, np.zeros((1, 77, 32)), np.array([0, 1]), np.zeros((77, 32)), [["x"]], overwrite=True)
    assert CaptionStore(out).texts == [["x"]] and sorted(os.listdir(tmp_path)) == ["ann.json", "clip", "store"]
    with pytest.raises(EngineError, match="1 items have no caption \\(first: item 1\\)"):
        encode_store([["a"], []], enc, str(tmp_path / "bad"))
    # damaged stores
    bad = str(tmp_path / "bad2")
    write_caption_store(bad, np.zeros((3, 77, 32)), np.array([0, 2, 3]), np.zeros((77, 32)), [["a", "b"], ["c"]])
    np.save(os.path.join(bad, "offsets.npy"), np.array([0, 3, 3]))
    with pytest.raises(CaptionStoreError, match="1 images have no caption \\(first: item 1\\)"):
        CaptionStore(bad)
    np.save(os.path.join(bad, "captions.npy"), np.zeros((3, 70, 32), dtype=np.float16))
    with pytest.raises(CaptionStoreError,
                       match="captions.npy has shape \\(3, 70, 32\\), meta.json says \\[3, 77, 32\\]"):
        CaptionStore(bad)
    os.remove(os.path.join(bad, "empty_context.npy"))
    with pytest.raises(CaptionStoreError, match="lacks empty_context.npy"):
        CaptionStore(bad)
    with pytest.raises(CaptionStoreError, match="not a caption store"):
        CaptionStore(str(tmp_path))


def small_store(tmp_path, counts=(1, 2, 3, 5), repa=True):
    g = np.random.default_rng(0)
    m = sum(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    feats = np.arange(m, dtype=np.float16)[:, None, None] * np.ones((1, 5, 12), dtype=np.float16)   # row id
    target = g.normal(size=(len(counts), 16, 8)) if repa else None
    path = write_caption_store(str(tmp_path / "s"), feats, offsets, g.normal(size=(5, 12)),
                               [[f"c{i}"] * c for i, c in enumerate(counts)], repa=target)
    return CaptionStore(path)


def test_captions_are_drawn_uniformly_by_stream_position_at_any_world_size(tmp_path):
    store = small_store(tmp_path)
    latents = TensorSource(torch.randn(4, 8, 4, 4))
    source = CaptionedLatentSource(latents, store, seed=3, repa=True)
    # uniform over the image's own captions
    rows = store.choose(np.full(20000, 3), np.arange(20000), 3)
    counts = np.bincount(rows - store.offsets[3], minlength=5)
    assert counts.min() > 3700 and counts.max() < 4300 and rows.min() >= 6 and rows.max() <= 10
    # the same captions for the same global batch at world size 1 and 2, and on a resumed stream
    sampler = ResumableSampler(4, seed=1)
    one = BatchStream(source, sampler, 0, 4, 0, 1, 3, "cpu")
    two = [BatchStream(source, sampler, 0, 4, r, 2, 3, "cpu") for r in range(2)]
    later = BatchStream(source, sampler, 8, 4, 0, 1, 1, "cpu")
    for k in range(3):
        m1, (c1, t1) = one.next()
        parts = [s.next() for s in two]
        assert torch.equal(c1, torch.cat([p[1][0] for p in parts]))
        assert torch.equal(t1, torch.cat([p[1][1] for p in parts]))
        if k == 2:
            assert torch.equal(later.next()[1][0], c1)
    with pytest.raises(CaptionStoreError, match="has captions for 4 images, the latent dataset  has 3"):
        CaptionedLatentSource(TensorSource(torch.randn(3, 8, 4, 4)), store)
    with pytest.raises(CaptionStoreError, match="holds no REPA encoder features"):
        CaptionedLatentSource(latents, small_store(tmp_path / "n", repa=False), repa=True)


def test_repa_features_follow_repas_preprocessing():
    """Normalise, then resize to 224 (bicubic, no antialias); the 37² position grid resampled to 16² by size with
    antialias; the final-norm patch tokens."""
    torch.manual_seed(0)
    net = DINOv2(dim=32, depth=2, heads=4, mlp=64)
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    img = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    x = (img.float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / \
        torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    grid = net.pos_embed[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 256, 32)
    h = F.conv2d(x, net.patch_embed.proj.weight, net.patch_embed.proj.bias, stride=14).flatten(2).transpose(1, 2)
    h = torch.cat([net.cls_token.expand(2, -1, -1), h], 1) + torch.cat([net.pos_embed[:, :1], grid], 1)
    for blk in net.blocks:
        h = blk(h)
    ref = F.layer_norm(h, (32,), net.norm.weight, net.norm.bias, 1e-6)[:, 1:]
    torch.testing.assert_close(net.repa_features(img), ref, rtol=1e-5, atol=1e-5)
    assert net.repa_features(img).shape == (2, 256, 32)


def mmdit():
    torch.manual_seed(0)
    net = MMDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, context_dim=12,
                context_tokens=5, projector_dim=16, z_dim=8, encoder_depth=1).double()
    net.set_null_context(torch.randn(5, 12, dtype=torch.float64))
    return net


@pytest.mark.parametrize("inner", ["fm", "mf", "cmt_mf"])
def test_repa_loss_equals_a_direct_recomputation(inner):
    """REPA(inner) − inner = λ·(−mean over tokens of cos(projector(h_k), y*)) per pair, h_k of the step's gradient
    forward; for CMT-MF pair row q·m + b aligns with image b."""
    net = mmdit()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    ctx = torch.randn(4, 5, 12, generator=g, dtype=torch.float64)
    target = torch.randn(4, 16, 8, generator=g, dtype=torch.float64)
    if inner == "fm":
        obj = FlowMatching(label_dropout=0.0)
    elif inner == "mf":
        obj = MeanFlow(label_dropout=0.0)
    else:
        obj = CMTMeanFlow(mmdit().eval().requires_grad_(False), teacher_kind="fm", trajectories_per_batch=4,
                          pairs_per_trajectory=3)
    rng = lambda: StepRNG.for_step(5, 0, 64)
    plain = obj(net, x, ctx, rng())
    with_repa = REPA(obj, weight=0.5)(net, x, (ctx, target), rng())
    if inner == "fm":                          # FlowMatching's own draws, in its order
        r = rng()
        t = logit_normal(4, -0.4, 1.0, r, "cpu", torch.float64)
        eps = r.randn(x.shape, "cpu", torch.float64)
        z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps
        _, zs = net(z, t, t, ctx, return_features=True)
        expected = 0.5 * -(F.normalize(zs[0], dim=-1) * F.normalize(target, dim=-1)).sum(-1).mean(1)
        torch.testing.assert_close(with_repa.loss - plain.loss, expected, rtol=1e-10, atol=1e-12)
    diff = with_repa.loss - plain.loss
    assert diff.shape == plain.loss.shape and (diff.abs() > 0).all() and (diff.abs() <= 0.5).all()
    if inner == "cmt_mf":                      # rows q·4 + b use image b's target: permuting images permutes rows
        perm = REPA(obj, 0.5)(net, x, (ctx, target[[1, 0, 2, 3]]), rng()).loss - plain.loss
        assert not torch.allclose(perm, diff) and perm.shape == (12,)
    with pytest.raises(EngineError, match="labels = \\(condition, encoder features"):
        REPA(obj)(net, x, ctx, rng())
    assert math.isclose(float(alignment(target, target).mean()), -1.0)


def test_evaluation_conditions_samples_on_captions_by_seed():
    """engine.evaluate with `conditions` (the COCO recipe's FID-30k): each sample's caption is a function of its
    seed alone, so the samples equal a direct sampling with those captions whatever the batch size."""
    from engine.evaluate import evaluate, to_uint8
    from engine.solvers import mean_flow_sampler
    net = mmdit().float()
    table = torch.randn(10, 5, 12)
    seen = []

    def conditions(seeds):
        seen.append(list(seeds))
        return table[torch.tensor(seeds) % 10]
    a = evaluate(net, (4, 8, 8), [(1.0,)], 4, batch=2, conditions=conditions, keep_samples=True, progress=False)
    b = evaluate(net, (4, 8, 8), [(1.0,)], 4, batch=4, conditions=conditions, keep_samples=True, progress=False)
    assert seen[:2] == [[0, 1], [2, 3]] and seen[2] == [0, 1, 2, 3]
    sa, sb = a["1-step"]["samples"], b["1-step"]["samples"]
    z = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in range(4)])
    direct = to_uint8(mean_flow_sampler(net, z, (1.0,), table[:4]))
    assert torch.equal(sa, sb) and torch.equal(sa, direct)
    other = to_uint8(mean_flow_sampler(net, z, (1.0,), table[4:8]))
    assert not torch.equal(direct, other)          # the captions matter
