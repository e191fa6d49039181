"""ROS 2 nodes: thin rclpy layers over the ROS-free core. The only package that imports rclpy."""
