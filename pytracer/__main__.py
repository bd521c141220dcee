from pytracer.cli import cli

cli()
