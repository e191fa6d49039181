from _model_test_utils import manifest_keys, save_vmamba_official, synthetic_state_dict
import pytest
import torch

from mamba_perception.models import create_model
from mamba_perception.models.classify import guess_model_name, imagenet_classes, main

Image = pytest.importorskip('PIL.Image')


def test_class_names():
    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == 'tench' and names[207] == 'golden retriever'


def test_guess_model_name(tmp_path):
    path = tmp_path / 'ckpt.pth'
    save_vmamba_official(path, synthetic_state_dict(manifest_keys('vmamba_small')))
    assert guess_model_name(str(path)) == 'vmamba_small'


@pytest.mark.parametrize('name', ['vim_test', 'vmamba_test'])
def test_classify_prints_top5(tmp_path, capsys, name):
    torch.manual_seed(0)
    model = create_model(name)
    head = model.head if name == 'vim_test' else model.classifier.head
    with torch.no_grad():
        head.bias.zero_()
        head.bias[207] = 50.0  # golden retriever wins whatever the features
        head.bias[1] = 45.0
    ckpt = tmp_path / 'ckpt.pth'
    torch.save({'model': model.state_dict(), 'epoch': 1}, ckpt)
    img = tmp_path / 'img.png'
    Image.new('RGB', (200, 130), (120, 200, 30)).save(img)
    assert main([str(ckpt), str(img), '--model', name, '--size', '64']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    assert lines[0].startswith('1. golden retriever') and lines[1].startswith('2. goldfish')
    scores = [float(line.split()[-1]) for line in lines]
    assert scores == sorted(scores, reverse=True) and 0.0 < scores[0] <= 1.0


def test_classify_reports_bad_checkpoint(tmp_path, capsys):
    img = tmp_path / 'img.png'
    Image.new('RGB', (64, 64)).save(img)
    ckpt = tmp_path / 'ckpt.pth'
    torch.save({'model': create_model('vim_test', num_classes=10).state_dict()}, ckpt)
    assert main([str(ckpt), str(img), '--model', 'vim_test']) == 2
    err = capsys.readouterr().err
    assert "shape mismatch for 'head.weight': checkpoint (10, 32) vs model (1000, 32)" in err
