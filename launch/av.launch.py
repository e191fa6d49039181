r"""Launch the mamba_perception node for one or more cameras (one node, one shared model).

::

    ros2 launch mamba_perception av.launch.py bundle_path:=/models/vmamba_t.safetensors \\
        camera_topics:="[/sensing/camera/front/image_raw, /sensing/camera/left/image_raw]"

Cameras are named after their topics (``/sensing/camera/front/image_raw`` -> ``front``) unless
``camera_names`` is given; outputs appear under ``/<namespace>/<name>/`` (``detections``,
``segmentation/mask``, ``label_info``, ``debug/overlay``). Topics ending in ``/compressed``
are read as ``sensor_msgs/CompressedImage`` (all cameras must then use it).

Everything the launch does is data in this module (``LAUNCH_ARGUMENTS``, ``camera_setup``,
``node_description``), which the tests import; ``generate_launch_description`` only turns it
into launch_ros actions and has no side effects.
"""

from mamba_perception.ros.topics import camera_name_from_topic

PACKAGE = 'mamba_perception'
EXECUTABLE = 'perception_node'
NODE_NAME = 'mamba_perception'

# (name, default, description, choices or None). '<share>' is this package's share directory.
LAUNCH_ARGUMENTS = (
    ('camera_topics', '[/camera/image_raw]',
     'Input image topics, one per camera, as a YAML list. Topics ending in /compressed are '
     'read as sensor_msgs/CompressedImage.', None),
    ('camera_names', '[]',
     'Camera names, one per topic (YAML list); empty: the topic segment before the last '
     '(/sensing/camera/front/image_raw -> front)', None),
    ('namespace', 'perception', 'Namespace of the node and its outputs', None),
    ('bundle_path', '', 'Model bundle (.safetensors); overrides params_file', None),
    ('device', 'auto', 'auto, cpu, cuda or cuda:<index>', None),
    ('precision', 'fp16', 'Inference precision', ('fp32', 'fp16', 'bf16')),
    ('use_sim_time', 'false', 'Follow /clock (rosbag replay with --clock)', ('true', 'false')),
    ('params_file', '<share>/config/av.yaml', 'Parameter file (/**: ros__parameters form)',
     None),
    ('autostart', 'true', 'Configure and activate at start (false: a lifecycle manager does)',
     ('true', 'false')),
    ('log_level', 'info', 'Node log level', ('debug', 'info', 'warn', 'error', 'fatal')),
)


def parse_list(text: str) -> list:
    """Parse a launch list argument: ``[a, b]``, ``['a', "b"]`` or ``a,b``; '' or [] -> []."""
    text = text.strip()
    if text.startswith('[') and text.endswith(']'):
        text = text[1:-1]
    return [item.strip().strip('\'"') for item in text.split(',') if item.strip().strip('\'"')]


def camera_setup(topics: list, names: list) -> tuple:
    """``(names, input_transport, remappings)`` for the node; ValueError when inconsistent."""
    if not topics:
        raise ValueError('camera_topics is empty: give at least one image topic')
    if names and len(names) != len(topics):
        raise ValueError(f'camera_names has {len(names)} entries for {len(topics)} topics')
    names = list(names) or [camera_name_from_topic(t, i) for i, t in enumerate(topics)]
    if len(set(names)) != len(names):
        names = [f'{name}{i}' for i, name in enumerate(names)]
    compressed = [t.rstrip('/').endswith('/compressed') for t in topics]
    if any(compressed) and not all(compressed):
        raise ValueError('mixing raw and /compressed camera topics is not supported: '
                         f'{topics}')
    transport = 'compressed' if all(compressed) else 'raw'
    suffix = 'image/compressed' if transport == 'compressed' else 'image'
    remappings = [(f'{name}/{suffix}', topic) for name, topic in zip(names, topics, strict=True)]
    return names, transport, remappings


def node_description(args: dict, share_dir: str) -> dict:
    """Keyword arguments of the launch_ros ``LifecycleNode`` for resolved argument ``args``."""
    names, transport, remappings = camera_setup(parse_list(args['camera_topics']),
                                                parse_list(args['camera_names']))
    overrides = {'cameras': names, 'input_transport': transport,
                 'device': args['device'], 'precision': args['precision'],
                 'use_sim_time': args['use_sim_time'] == 'true',
                 'autostart': args['autostart'] == 'true'}
    if args['bundle_path']:
        overrides['bundle_path'] = args['bundle_path']
    params_file = args['params_file'].replace('<share>', share_dir)
    return dict(package=PACKAGE, executable=EXECUTABLE, name=NODE_NAME,
                namespace=args['namespace'], output='screen',
                parameters=[params_file, overrides], remappings=remappings,
                ros_arguments=['--log-level', args['log_level']])


def generate_launch_description():
    """Declare the arguments and one perception LifecycleNode built from them."""
    from ament_index_python.packages import get_package_share_directory
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import LifecycleNode

    from launch import LaunchDescription

    share_dir = get_package_share_directory(PACKAGE)

    def make_node(context):
        args = {name: LaunchConfiguration(name).perform(context)
                for name, *_ in LAUNCH_ARGUMENTS}
        return [LifecycleNode(**node_description(args, share_dir))]

    declared = []
    for name, default, description, choices in LAUNCH_ARGUMENTS:
        kwargs = {'choices': list(choices)} if choices else {}
        declared.append(DeclareLaunchArgument(
            name, default_value=default.replace('<share>', share_dir), description=description,
            **kwargs))
    return LaunchDescription([*declared, OpaqueFunction(function=make_node)])

