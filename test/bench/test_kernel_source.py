"""bench/kernel_source.py on a log shaped like inductor's output_code (wrapper.py's format)."""

from bench_modules import load

kernel_source = load('kernel_source')


def _definition(name, body):
    # As inductor's wrapper writes a kernel: the name, then the source between ''' quotes.
    return (f"{name} = async_compile.triton({name!r}, '''\n"
            "import triton\n"
            "@triton_heuristics.persistent_reduction(size_hints={'x': 65536, 'r0_': 128})\n"
            f"@triton.jit\ndef {name}(in_ptr0, out_ptr0, xnumel):\n    {body}\n"
            "''', device_str='cuda')\n")


LOG = ("V1128 12:00:00.000000 123 torch/_inductor/graph.py:2300] [0/0] [__output_code] "
       "Output code: \n"
       "from torch._inductor.async_compile import AsyncCompile\n"
       + _definition('triton_per_fused_native_layer_norm_0', 'x = 0')
       + _definition('triton_per_fused__to_copy_native_layer_norm_1', 'x = 1')
       + "V1128 12:00:01.000000 123 torch/_inductor/graph.py:2300] [1/0] [__output_code] "
         "Output code: \n"
       + _definition('triton_per_fused__to_copy_native_layer_norm_1', 'x = 2'))


def test_kernel_sources_finds_each_definition():
    found = kernel_source.kernel_sources(LOG)
    assert sorted(found) == ['triton_per_fused__to_copy_native_layer_norm_1',
                             'triton_per_fused_native_layer_norm_0']
    first, second = found['triton_per_fused__to_copy_native_layer_norm_1']
    # the heuristics decorator (launch hints) comes with the kernel; nothing of the wrapper
    assert first.startswith('import triton\n@triton_heuristics.persistent_reduction(')
    assert first.endswith('x = 1') and second.endswith('x = 2')
    assert 'device_str' not in first
    only = kernel_source.kernel_sources(LOG, {'triton_per_fused_native_layer_norm_0'})
    assert list(only) == ['triton_per_fused_native_layer_norm_0']


def test_kernel_sources_strips_the_logging_prefix_of_every_line():
    # torch 2.11 writes the artifact with the logging prefix on each line of the module
    prefix = 'V1128 17:24:13.721000 516 torch/_inductor/graph.py:2552] [0/0] [__output_code] '
    log = ''.join(prefix + line + '\n' for line in LOG.splitlines())
    found = kernel_source.kernel_sources(log)
    assert found == kernel_source.kernel_sources(LOG)
    assert '__output_code' not in found['triton_per_fused_native_layer_norm_0'][0]


def test_cli_writes_one_file_per_kernel_and_fails_on_a_missing_name(tmp_path, capsys):
    log = tmp_path / 'output_code.log'
    log.write_text(LOG)
    name = 'triton_per_fused__to_copy_native_layer_norm_1'
    assert kernel_source.main([str(log), name, '--out-dir', str(tmp_path / 'k')]) == 0
    text = (tmp_path / 'k' / f'{name}.py').read_text()
    assert text.count('\n# ---\n') == 1 and 'x = 1' in text and 'x = 2' in text
    assert kernel_source.main([str(log), 'triton_poi_fused_add_9']) == 1
    assert 'not in' in capsys.readouterr().err
