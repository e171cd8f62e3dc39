"""Getting the data: downloads (HTTP/FTP, GEO, SRA/ENA reads) and quantification of reads."""
