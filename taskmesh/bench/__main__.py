from .command import bench

bench(prog_name="python -m taskmesh.bench")
