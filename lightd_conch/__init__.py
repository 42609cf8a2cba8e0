"""
lightd-sftp: per-container SFTP access to container volumes, on Twisted Conch.

Run it with ``twistd lightd-sftp``; manage credentials with the ``lightd-sftp``
console script.  See README.rst.
"""
