"""tb-diag: a TensorBoard plugin and a logging shim that explain why training goes wrong."""

from setuptools import setup

# TensorBoard 2.21 requires protobuf>=6.31.1,<8; our generated code
# (grpcio-tools 1.74.0, stamp 6.31.1) imports under that whole range.
INSTALL_REQUIRES = [
    "torch>=2.1",
    "tensorboard>=2.16",
    "protobuf>=6.31.1,<8",
    "numpy>=1.23",
    "plotly>=5",
    # CRC-32C in C, to find the damaged event records that TensorBoard silently
    # stops at (tb_diag_plugin/reading/integrity.py); without it only lengths are checked.
    "google-crc32c>=1.5",
]

TEST_REQUIRES = [
    "pytest>=7",
    "pytest-timeout>=2",
    "playwright>=1.40",
    "ruff>=0.5",
    "build>=1",
    "pandas>=1.5",  # the export test reads the CSV the way users will
    # The Lightning callback is tested on both packages, real trainings on CPU.
    "lightning>=2.0",
    "pytorch-lightning>=2.0",
    # transformers and accelerate: the HF integration is tested on the real frameworks (CPU).
    "transformers>=5",
    "accelerate>=1",
]

setup(
    name="tb-diag",
    version="0.1.0",
    description="TensorBoard Diagnostics tab: why your PyTorch training is going wrong",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["tb_diag_plugin", "tb_diag_plugin.findings", "tb_diag_plugin.findings.rules", "tb_diag_plugin.reading",
              "tb_diag_plugin.serving", "tb_diag_logger", "tb_diag_logger.collectors",
              "tb_diag_logger.integrations",
              "tb_diag_plugin.frontend_static"],
    package_dir={
        "tb_diag_plugin": "tb_diag_plugin",
        "tb_diag_logger": "logger",
        # The tab's files live at the top level and ship inside the plugin
        # package, where the static route finds them.
        "tb_diag_plugin.frontend_static": "frontend_static",
    },
    package_data={
        "tb_diag_plugin": ["*.proto", "*.md"],
        "tb_diag_plugin.frontend_static": ["*.js", "*.css", "views/*.js"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={
        "tensorboard_plugins": ["diagnostics = tb_diag_plugin.diagnostics_plugin:DiagnosticsLoader"],
        "console_scripts": ["tb-diag = tb_diag_plugin.cli:main"],
    },
    license="Apache-2.0",
)
