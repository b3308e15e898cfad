"""Draw one triggered image per trigger into one PNG (the README's trigger gallery).

    python show_triggers.py --data_root /tmp/data/cifar10 --output results/triggers.png
"""
import os
import tempfile

import numpy as np
import torch

from cli import main_guard, parse_args
from decoding import load_dataset
from errors import UserError
from refool import reflection_images
from triggers import TRIGGERS, TriggerError, apply_trigger, make_trigger, refool_trigger

SCALE, GAP = 4, 6


def reflection_demo(data, image, seed):
    """Refool's trigger for the gallery: another test image as the reflection, out of focus (sigma 2) at
    transmission weight 0.7 (a model's own reflections are chosen when it is trained: refool.py)."""
    other = data['x_test'][(seed + 1) % len(data['x_test'])]
    _, _, layer = reflection_images(image[0].double() / 255, other.double() / 255, 'blur',
                                    {'alpha_t': 0.7, 'sigma': 2.0, 'att': 1.1})
    return refool_trigger(layer[None], torch.ones(1))


def main():
    args = parse_args('show_triggers.py', description=__doc__.split('\n\n')[0])
    from PIL import Image, ImageDraw
    data = load_dataset(args.dataset, args.data_root, args.image_size)
    image = data['x_test'][args.seed % len(data['x_test'])][None]
    size = image.shape[1]
    tiles = [('clean', image[0])]
    for kind in TRIGGERS:
        path = args.trigger_path
        if kind == 'trojanTrigger' and not path:  # draw with a small additive square when no file is given
            pattern = np.zeros((size, size, 3), np.float32)
            pattern[size - 8:size - 2, size - 8:size - 2] = 120
            tmp = tempfile.TemporaryDirectory()
            path = os.path.join(tmp.name, 'trojan_demo.npy')
            np.save(path, pattern)
        try:
            trig = reflection_demo(data, image, args.seed) if kind == 'refoolTrigger' else \
                make_trigger(kind, size, 3, 3, path if kind == 'trojanTrigger' else None, args.seed)
        except TriggerError as e:
            raise UserError(str(e))
        tiles.append((kind.replace('Trigger', ''), apply_trigger(trig, image, torch.Generator().manual_seed(0))[0]))
        if kind == 'trojanTrigger' and not args.trigger_path:
            tmp.cleanup()
    w = size * SCALE
    canvas = Image.new('RGB', (len(tiles) * (w + GAP) - GAP, w + 16), 'white')
    draw = ImageDraw.Draw(canvas)
    for i, (name, img) in enumerate(tiles):
        big = Image.fromarray(img.numpy()).resize((w, w), Image.NEAREST)
        canvas.paste(big, (i * (w + GAP), 16))
        draw.text((i * (w + GAP) + 2, 2), name, fill='black')
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    canvas.save(args.output)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main_guard(main)
