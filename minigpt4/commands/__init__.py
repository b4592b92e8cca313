"""The commands: argument parsing, output folders, model building and ``main(argv)`` of every
entry point (issue 24). The libraries below them (``evaluation``, ``training``, ``inference``,
``scan_outputs``, ``models``, ``data``, ...) never import a command; the top-level scripts and the
``python -m minigpt4.X`` modules only call ``run_main(commands.X.main)``.
"""
