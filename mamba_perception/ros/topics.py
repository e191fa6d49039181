"""Topic naming rules shared by the launch file and replay's live mode (no rclpy here)."""


def camera_name_from_topic(topic: str, index: int) -> str:
    """Camera name of an image topic: ``/sensing/camera/front/image_raw`` -> ``front``.

    A trailing ``/compressed`` is ignored; the segment before the last is sanitised to a valid
    ROS name, and ``camera<index>`` is used when nothing usable remains.
    """
    parts = [p for p in topic.split('/') if p]
    if parts and parts[-1] == 'compressed':
        parts = parts[:-1]
    name = parts[-2] if len(parts) >= 2 else f'camera{index}'
    name = ''.join(c if c.isalnum() or c == '_' else '_' for c in name)
    return name if name[:1].isalpha() else f'camera{index}'
