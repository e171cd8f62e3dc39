sra
