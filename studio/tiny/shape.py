"""Tiny Shap-E: the real prior / renderer / CLIP text encoder classes with tiny configs, saved as a ShapEPipeline.

The tiny renderer gets a full marching-cubes lookup table, computed here (`marching_cubes_table`; the real
checkpoint ships its own), so `decode_to_mesh` and `output_type="mesh"` work as with the real model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from studio.registry import ModelSpec
from studio.tiny import seeded
from studio.tiny.image import clip_tokenizer

# Corner i of a grid cell sits at (x, y, z) = (i & 1, i >> 1 & 1, i >> 2): diffusers' MeshDecoder builds the
# case index from the corners in this order (x is the least significant bit).
CORNERS = [(i & 1, i >> 1 & 1, i >> 2) for i in range(8)]
# The cell's 12 edges in MeshDecoder's order (`_create_flat_edge_indices`): 4 along x, 4 along y, 4 along z,
# each group ordered by the other two coordinates, the lower axis first.
EDGES = [(a, a | 1 << axis) for axis in range(3) for a in range(8) if not a >> axis & 1]


def _face_segments(inside: list[bool]) -> list[tuple[int, int]]:
    """The surface's crossings of each cell face, as pairs of edge indices.

    A face whose diagonal corners alone are inside is ambiguous; the rule "keep inside corners apart" only
    depends on the face itself, so the two cells sharing it agree and the mesh stays closed.
    """
    segments = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for side in (0, 1):
            ring = [side << axis | du << u | dv << v for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1))]
            sides = [EDGES.index(tuple(sorted((ring[k], ring[(k + 1) % 4])))) for k in range(4)]
            crossing = [k for k in range(4) if inside[ring[k]] != inside[ring[(k + 1) % 4]]]
            if len(crossing) == 2:
                segments.append((sides[crossing[0]], sides[crossing[1]]))
            elif len(crossing) == 4:  # the two edges around each inside corner enclose it alone
                segments += [(sides[k - 1], sides[k]) for k in range(4) if inside[ring[k]]]
    return segments


def _loops(segments: list[tuple[int, int]]) -> list[list[int]]:
    """Chain the face segments into closed polygons (every crossed edge belongs to exactly two faces)."""
    links: dict[int, list[int]] = {}
    for a, b in segments:
        links.setdefault(a, []).append(b)
        links.setdefault(b, []).append(a)
    loops, seen = [], set()
    for start in links:
        if start in seen:
            continue
        loop = [start, links[start][0]]
        while loop[-1] != start:
            a, b = links[loop[-1]]
            loop.append(b if a == loop[-2] else a)
        loop.pop()
        seen.update(loop)
        loops.append(loop)
    return loops


def _on_one_face(e1: int, e2: int) -> bool:
    ends = EDGES[e1] + EDGES[e2]
    return any(len({c >> axis & 1 for c in ends}) == 1 for axis in range(3))


def _fan(loop: list[int]) -> list[tuple[int, int, int]]:
    """Triangulate a polygon as a fan from a corner whose diagonals all run through the cell.

    A diagonal lying in a cell face would be shared with the neighbouring cell's polygon (an edge of four
    triangles: the mesh would not be a closed manifold).
    """
    n = len(loop)
    apex = next(k for k in range(n) if not any(_on_one_face(loop[k], loop[(k + j) % n]) for j in range(2, n - 1)))
    loop = loop[apex:] + loop[:apex]
    return [(loop[0], loop[k], loop[k + 1]) for k in range(1, n - 1)]


def marching_cubes_table() -> tuple[torch.Tensor, torch.Tensor]:
    """The `cases` [256, 5, 3] and `masks` [256, 5] buffers of diffusers' `MeshDecoder`, computed.

    Why here: `MeshDecoder` registers both buffers as zeros and the real openai/shap-e checkpoint stores the
    filled table, so a freshly built renderer has an empty table and `output_type="mesh"` fails
    (`torch.cat(): expected a non-empty list`). For each of the 256 inside/outside corner patterns the surface
    crosses some of the 12 edges; the face crossings chain into polygons, fanned into at most 5 triangles, wound
    counter-clockwise seen from outside (field <= 0), like the real table.
    """
    corner = np.array(CORNERS, dtype=float)
    cases = torch.zeros(256, 5, 3, dtype=torch.long)
    masks = torch.zeros(256, 5, dtype=torch.bool)
    for case in range(256):
        inside = [bool(case >> i & 1) for i in range(8)]
        triangles = []
        for loop in _loops(_face_segments(inside)):
            ends = [(corner[a], corner[b]) if inside[a] else (corner[b], corner[a])
                    for a, b in (EDGES[e] for e in loop)]
            points = [(p + q) / 2 for p, q in ends]
            normal = sum(np.cross(points[k], points[(k + 1) % len(points)]) for k in range(len(points)))
            outward = sum(q - p for p, q in ends)  # inside corner -> outside corner, over the crossed edges
            if np.dot(normal, outward) < 0:
                loop = loop[::-1]
            triangles += _fan(loop)
        assert len(triangles) <= 5, f"case {case}: {len(triangles)} triangles"
        for j, tri in enumerate(triangles):
            cases[case, j] = torch.tensor(tri)
            masks[case, j] = True
    return cases, masks


def _renderer(latent: int, hidden: int):
    """The renderer MLP the latent's rows become the weights of (4 * hidden rows in all), with the computed
    marching-cubes table."""
    from diffusers.pipelines.shap_e import ShapERenderer

    renderer = ShapERenderer(
        param_shapes=((hidden, 93), (hidden, hidden), (hidden, hidden), (hidden, hidden)),
        d_latent=latent, d_hidden=hidden, n_output=12, background=(255.0, 255.0, 255.0))
    cases, masks = marching_cubes_table()
    renderer.mesh_decoder.cases.copy_(cases)
    renderer.mesh_decoder.masks.copy_(masks)
    return renderer


def _scheduler():
    """openai/shap-e's (and shap-e-img2img's) scheduler configuration."""
    from diffusers import HeunDiscreteScheduler

    return HeunDiscreteScheduler(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                                 use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0)


def build_shap_e(folder: Path, spec: ModelSpec) -> None:
    from diffusers import PriorTransformer, ShapEPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    seeded()
    width, latent, hidden = 32, 32, 8  # text embedding, latent (the real 1024) and renderer MLP (the real 256)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, projection_dim=width, intermediate_size=2 * width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    # The real prior's layout (no extra tokens, layer-norm input, GELU time embedding), tiny sizes. Its output is
    # twice the latent width: the noise prediction and the variance the pipeline splits off.
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=latent, num_embeddings=4 * hidden,
        additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer", encoder_hid_proj_type=None,
        added_emb_type=None, time_embed_dim=4 * latent, embedding_proj_dim=width, clip_embed_dim=2 * latent)
    renderer = _renderer(latent, hidden)
    ShapEPipeline(prior=prior, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_scheduler(),
                  shap_e_renderer=renderer).save_pretrained(folder)


def build_shap_e_img2img(folder: Path, spec: ModelSpec) -> None:
    """Shap-E's image-to-3D pipeline: the prior reads a CLIP vision encoder's patch embeddings (the real one 256
    patches of 1024 wide) through a layer-normed projection, as openai/shap-e-img2img's does."""
    from diffusers import PriorTransformer, ShapEImg2ImgPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    seeded()
    width, latent, hidden, side = 32, 32, 8, 32
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4, image_size=side,
        patch_size=8, projection_dim=width))
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=latent, num_embeddings=4 * hidden,
        additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer", embedding_proj_norm_type="layer",
        encoder_hid_proj_type=None, added_emb_type=None, time_embed_dim=4 * latent, embedding_proj_dim=width,
        clip_embed_dim=2 * latent)
    ShapEImg2ImgPipeline(prior=prior, image_encoder=image_encoder, image_processor=processor, scheduler=_scheduler(),
                         shap_e_renderer=_renderer(latent, hidden)).save_pretrained(folder)
