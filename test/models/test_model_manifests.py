"""Our state_dict() keys and shapes == the manifests generated from the official code."""

from _model_test_utils import manifest, manifest_keys
import pytest
import torch

from mamba_perception.models import create_model, list_models

VMAMBA = manifest('vmamba')
VIM = manifest('vim')


def test_manifests_name_their_source():
    assert VMAMBA['source']['repo'] == 'MzeroMiko/VMamba'
    assert VMAMBA['source']['commit'].startswith('2ed52ea')
    assert VIM['source']['repo'] == 'hustvl/Vim'
    assert VIM['source']['commit'].startswith('dd0358a')


@pytest.mark.parametrize('entry', sorted(VMAMBA['models']) + sorted(VIM['models']))
def test_state_dict_keys_and_shapes_equal_manifest(entry):
    name, _, variant = entry.partition('.')
    overrides = {'backbone': True} if variant == 'backbone' else {}
    with torch.device('meta'):
        model = create_model(name, **overrides)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = manifest_keys(entry)
    assert sorted(set(official) - set(ours)) == []  # missing
    assert sorted(set(ours) - set(official)) == []  # extra
    assert {k: s for k, s in ours.items() if official[k] != s} == {}
    family = VIM if name.startswith('vim') else VMAMBA
    assert sum(p.numel() for p in model.parameters()) == family['models'][entry]['num_params']


def test_every_real_model_has_a_manifest():
    covered = {e.partition('.')[0] for e in list(VMAMBA['models']) + list(VIM['models'])}
    assert set(list_models()) - covered == {'vmamba_test', 'vim_test'}


def test_registry():
    assert 'vmamba_tiny' in list_models() and list_models() == sorted(list_models())
    with pytest.raises(KeyError, match='vmamba_tyni'):
        create_model('vmamba_tyni')
    m = create_model('vim_test', num_classes=7)
    assert m.head.out_features == 7 and m.model_name == 'vim_test'


def test_building_models_imports_no_kernels():
    import subprocess
    import sys
    code = ('import sys, torch; from mamba_perception.models import create_model; '
            'create_model("vmamba_test"); create_model("vim_test"); '
            'print("mamba_perception_kernels" in sys.modules, "triton" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'False']
