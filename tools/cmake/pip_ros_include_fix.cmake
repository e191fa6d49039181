# CMake project include (-DCMAKE_PROJECT_INCLUDE=<this file>) for building ROS 2 interface
# packages against the PyPI ros-kilted-* wheels.
#
# Why: the message wheels' exported CMake targets (<pkg>::<pkg>__rosidl_generator_py) list the
# include directories of the machine that built the wheels (/opt/python/cp3XX-cp3XX/...). Any
# rosidl_generate_interfaces() depending on std_msgs/geometry_msgs then stops at generate time
# with 'includes non-existent path'. After the project's CMakeLists has run, this rewrites those
# directories to this interpreter's Python and numpy include directories.

function(mamba_perception_rewrite_wheel_includes)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import sysconfig, numpy; print(sysconfig.get_paths()['include'] + ';' + numpy.get_include())"
    OUTPUT_VARIABLE _dirs OUTPUT_STRIP_TRAILING_WHITESPACE
    COMMAND_ERROR_IS_FATAL ANY)
  list(GET _dirs 0 _python_include)
  list(GET _dirs 1 _numpy_include)
  get_property(_imported DIRECTORY "${CMAKE_SOURCE_DIR}" PROPERTY IMPORTED_TARGETS)
  foreach(_target IN LISTS _imported)
    get_target_property(_includes ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT _includes OR NOT _includes MATCHES "/opt/python/cp3")
      continue()
    endif()
    string(REGEX REPLACE
      "/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\\.[0-9]+/site-packages/numpy/_core/include"
      "${_numpy_include}" _includes "${_includes}")
    string(REGEX REPLACE "/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\\.[0-9]+"
      "${_python_include}" _includes "${_includes}")
    set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_includes}")
  endforeach()
endfunction()

if(NOT Python3_EXECUTABLE)
  message(FATAL_ERROR "pass -DPython3_EXECUTABLE=<the virtual environment's python>")
endif()
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL mamba_perception_rewrite_wheel_includes)
