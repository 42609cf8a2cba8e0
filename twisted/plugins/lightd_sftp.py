from twisted.application.service import ServiceMaker

lightdSFTP = ServiceMaker(
    "lightd-sftp",
    "lightd_conch.tap",
    "Per-container SFTP service for container hosts",
    "lightd-sftp",
)
