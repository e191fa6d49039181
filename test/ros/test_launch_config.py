"""av.launch.py and config/av.yaml against the parameter table of the node.

launch / launch_ros are not installable here, so the launch file keeps its whole mapping as
module data and pure functions, tested below; test_node_outputs.py starts the node with exactly
the parameters and remappings that ``node_description`` produces. The last test runs
``generate_launch_description`` through the real launch_ros where it is importable.
"""

import importlib.util
from pathlib import Path

import pytest
import yaml

from mamba_perception.ros import params

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_FILE = ROOT / 'launch' / 'av.launch.py'
CONFIG_FILE = ROOT / 'config' / 'av.yaml'


def load_launch_module():
    spec = importlib.util.spec_from_file_location('av_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_args(module, **overrides):
    args = {name: default for name, default, *_ in module.LAUNCH_ARGUMENTS}
    args.update(overrides)
    return args


def test_yaml_lists_every_parameter_with_its_default_and_a_comment():
    text = CONFIG_FILE.read_text()
    doc = yaml.safe_load(text)
    assert list(doc) == ['/**']
    values = doc['/**']['ros__parameters']
    assert set(values) == set(params.BY_NAME), 'config/av.yaml and ros/params.py differ'
    for name, value in values.items():
        default = params.BY_NAME[name].default
        assert value == default and type(value) is type(default), name
        assert params.validate(name, value) is None or name == 'device'
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().split(':')[0] in values:
            assert lines[i - 1].strip().startswith('#'), f'{line.strip()} has no comment'


def test_parameter_table_is_well_formed():
    for spec in params.PARAMETERS:
        assert spec.description, spec.name
        if spec.low is not None:
            assert spec.low <= spec.default <= spec.high, spec.name
        if spec.choices:
            assert spec.default in spec.choices, spec.name
        descriptor = params.descriptor(spec)
        assert descriptor.description == spec.description
        if isinstance(spec.default, float) and spec.low is not None:
            assert descriptor.floating_point_range[0].to_value == spec.high


@pytest.mark.parametrize('name,value,match', [
    ('device', 'tpu', 'unknown device'),
    ('device', 'cuda:x', 'unknown device'),
    ('precision', 'int4', 'unknown value'),
    ('score_threshold', 1.5, 'out of range'),
    ('score_threshold', 1.0, 'below 1'),
    ('nms_iou', 0.0, 'out of range'),
    ('batch_window_ms', -1.0, 'out of range'),
    ('max_detections', 0, 'out of range'),
    ('bundle_path', '/no/such/bundle.safetensors', 'does not exist'),
    ('cameras', [], 'at least one'),
    ('cameras', ['front', 'front'], 'duplicates'),
    ('cameras', ['front/left'], 'not a valid'),
    ('input_transport', 'theora', 'unknown value'),
    ('warmup_size_px', [720], 'height, width'),
])
def test_bad_values_are_rejected_with_a_reason(name, value, match):
    reason = params.validate(name, value)
    assert reason is not None and name in reason
    assert match in reason


def test_cuda_device_rejected_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    assert 'not available' in params.validate('device', 'cuda')
    assert params.validate('device', 'cpu') is None
    assert params.validate('use_sim_time', True) is None  # not ours: never rejected


def test_launch_arguments_cover_the_interface():
    module = load_launch_module()
    names = [a[0] for a in module.LAUNCH_ARGUMENTS]
    for required in ('camera_topics', 'namespace', 'bundle_path', 'device', 'precision',
                     'use_sim_time', 'params_file'):
        assert required in names
    assert len(names) == len(set(names))
    choices = {a[0]: a[3] for a in module.LAUNCH_ARGUMENTS}
    assert tuple(choices['precision']) == params.BY_NAME['precision'].choices
    for name, default, description, options in module.LAUNCH_ARGUMENTS:
        assert description
        if options:
            assert default in options, name


def test_camera_setup_maps_topics_to_cameras():
    module = load_launch_module()
    names, transport, remaps = module.camera_setup(
        ['/sensing/camera/front/image_raw', '/sensing/camera/left/image_raw'], [])
    assert names == ['front', 'left'] and transport == 'raw'
    assert remaps == [('front/image', '/sensing/camera/front/image_raw'),
                      ('left/image', '/sensing/camera/left/image_raw')]
    names, transport, remaps = module.camera_setup(['/cam/image_raw/compressed'], ['rear'])
    assert names == ['rear'] and transport == 'compressed'
    assert remaps == [('rear/image/compressed', '/cam/image_raw/compressed')]
    assert module.camera_setup(['/image'], [])[0] == ['camera0']
    assert module.camera_setup(['/a/x/image', '/b/x/image'], [])[0] == ['x0', 'x1']
    with pytest.raises(ValueError, match='mixing'):
        module.camera_setup(['/a/image', '/b/image/compressed'], [])
    with pytest.raises(ValueError, match='camera_names'):
        module.camera_setup(['/a/image'], ['x', 'y'])
    assert module.parse_list("['/a/b', \"/c/d\"]") == ['/a/b', '/c/d']
    assert module.parse_list('[]') == [] and module.parse_list('/x,/y') == ['/x', '/y']


def test_node_description_uses_only_table_parameters():
    module = load_launch_module()
    desc = module.node_description(default_args(
        module, bundle_path='/m.safetensors', camera_topics='[/cams/front/image_raw]',
        use_sim_time='true'), '/opt/share/mamba_perception')
    assert desc['package'] == 'mamba_perception' and desc['executable'] == 'perception_node'
    assert desc['name'] and desc['namespace'] == 'perception'
    params_file, overrides = desc['parameters']
    assert params_file == '/opt/share/mamba_perception/config/av.yaml'
    for name, value in overrides.items():
        assert name == 'use_sim_time' or name in params.BY_NAME, name
        if name in params.BY_NAME and name not in ('bundle_path', 'device'):
            assert params.validate(name, value) is None, name
    assert overrides['use_sim_time'] is True and overrides['cameras'] == ['front']
    assert desc['remappings'] == [('front/image', '/cams/front/image_raw')]
    assert 'bundle_path' not in module.node_description(default_args(module), '/s')[
        'parameters'][1]


def test_installed_share_has_launch_and_config(install_prefix):
    share = install_prefix / 'share' / 'mamba_perception'
    assert (share / 'launch' / 'av.launch.py').is_file()
    assert (share / 'config' / 'av.yaml').is_file()


def test_generate_launch_description_with_real_launch_ros():
    pytest.importorskip('launch_ros', reason='launch_ros is not installed (no ROS distro here)')
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch_ros.actions import LifecycleNode

    from launch import LaunchContext
    module = load_launch_module()
    description = module.generate_launch_description()
    declared = [e for e in description.entities if isinstance(e, DeclareLaunchArgument)]
    assert [d.name for d in declared] == [a[0] for a in module.LAUNCH_ARGUMENTS]
    context = LaunchContext()
    context.launch_configurations.update(
        {d.name: d.default_value[0].perform(context) for d in declared})
    context.launch_configurations['camera_topics'] = '[/a/front/image_raw]'
    opaque = [e for e in description.entities if isinstance(e, OpaqueFunction)][0]
    nodes = opaque.execute(context)
    assert len(nodes) == 1 and isinstance(nodes[0], LifecycleNode)
