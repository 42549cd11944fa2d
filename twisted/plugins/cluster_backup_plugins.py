from twisted.application.service import ServiceMaker

cbackup_server = ServiceMaker(
    "cbackup-server", "cluster_backup.server_tap",
    "cluster-backup server: serves this host's sources to backup clients", "cbackup-server")
cbackup_client = ServiceMaker(
    "cbackup-client", "cluster_backup.client_tap",
    "cluster-backup client: fills this host's stores from the servers", "cbackup-client")
