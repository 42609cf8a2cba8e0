from setuptools import setup

setup(
    name="lightd-sftp",
    version="0.1.0",
    description="Per-container SFTP service for container hosts, on Twisted Conch",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.10",
    packages=["lightd_conch", "twisted.plugins"],
    package_data={"twisted": ["plugins/lightd_sftp.py"]},
    install_requires=[
        "twisted[conch]>=24.7",
        "cryptography>=42",
        "bcrypt>=4.1",
        "pyasn1",
        "lmdb>=1.4",
        "pathspec>=0.12",
        "prometheus-client>=0.17",
    ],
    extras_require={
        "test": ["paramiko>=3.4", "asyncssh>=2.14", "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": ["lightd-sftp = lightd_conch.cli:main"]},
)
