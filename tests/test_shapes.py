"""tlama_mini.shapes: the seeded image-caption data set of lesson 13."""
import pytest
import torch

from tlama_mini import shapes


def test_same_seed_same_data_other_seed_other_data():
    a, sa = shapes.make_shapes(20, seed=3)
    b, sb = shapes.make_shapes(20, seed=3)
    c, _ = shapes.make_shapes(20, seed=4)
    assert torch.equal(a, b) and sa == sb and not torch.equal(a, c)
    assert a.shape == (20, 3, 16, 16) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1


def test_each_shape_is_drawn_in_its_colour_inside_its_quadrant():
    images, specs = shapes.make_shapes(200, seed=0, image_size=32)
    for img, s in zip(images, specs):
        mask = shapes.shape_mask(s, 32)
        ys, xs = torch.where(mask)
        assert mask.sum() > 20
        assert ((ys < 16) if s.row == "top" else (ys >= 16)).all()
        assert ((xs < 16) if s.column == "left" else (xs >= 16)).all()
        colour = torch.tensor(shapes.COLOURS[s.colour])
        pixel = img[:, ys[0], xs[0]]
        assert torch.allclose(pixel / pixel.max(), colour / colour.max(), atol=1e-5)


def test_shapes_differ_and_every_word_occurs():
    _, specs = shapes.make_shapes(400, seed=1)
    for words in (shapes.COLOURS, shapes.SHAPES, shapes.ROWS, shapes.COLUMNS):
        seen = {w for s in specs for w in s.caption.split()} & set(words)
        assert seen == set(words)
    base = shapes.Shape("red", "square", "top", "left", 8.0, 8.0, 6.0)
    masks = [shapes.shape_mask(shapes.Shape("red", kind, "top", "left", 8.0, 8.0, 6.0), 16) for kind in shapes.SHAPES]
    assert all(not torch.equal(masks[i], masks[j]) for i in range(4) for j in range(i + 1, 4))
    assert base.caption == "a red square at top left"


def test_training_batch_predicts_only_the_caption():
    _, specs = shapes.make_shapes(3, seed=2)
    inputs, targets = shapes.training_batch(specs, tokens_per_image=4)
    assert inputs.shape == targets.shape == (3, 4 + 1 + shapes.CAPTION_LEN)
    assert inputs[0, :4].tolist() == [shapes.IMG] * 4 and inputs[0, 4] == shapes.BOS
    assert targets[0, :4].tolist() == [-100] * 4
    assert shapes.decode_caption(targets[0, 4:]) == specs[0].caption and targets[0, -1] == shapes.EOS
    assert torch.equal(inputs[:, 1:], targets[:, :-1].where(targets[:, :-1] >= 0, inputs[:, 1:]))


def test_caption_round_trip_and_errors():
    ids = shapes.encode_caption("a blue cross at bottom right")
    assert shapes.decode_caption(ids + [shapes.EOS, 5]) == "a blue cross at bottom right"
    with pytest.raises(ValueError, match=r"\['purple'\] are not in the shapes vocabulary"):
        shapes.encode_caption("a purple cross at bottom right")
    with pytest.raises(ValueError, match="image_size >= 8"):
        shapes.make_shapes(4, seed=0, image_size=4)
